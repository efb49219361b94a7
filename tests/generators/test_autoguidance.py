import pytest
import torch

from generators.guidance import autoguidance, cfg, combine, guided


def test_guide_equal_to_model_gives_the_conditional_prediction(tiny_dit):
    model = tiny_dit()
    x, t, y = torch.randn(3, 8, 8, 8), torch.full((3,), 0.6), torch.tensor([1, 5, 9])
    assert torch.allclose(autoguidance(model, model, y, 1.42)(x, t), model(x, t, y), atol=1e-6)


def test_formula_interval_and_channels(tiny_dit):
    main, weak = tiny_dit(), tiny_dit(depth=1)
    x, y = torch.randn(2, 8, 8, 8), torch.tensor([1, 2])
    t = torch.tensor([0.05, 0.5])
    v_main, v_weak = main(x, t, y), weak(x, t, y)  # both see the same labels
    out = autoguidance(main, weak, y, 1.42, interval=(0.1, 1.0), channels=[0, 1, 2])(x, t)
    assert torch.equal(out[0], v_main[0])  # outside the interval
    assert torch.allclose(out[1], combine(v_main, v_weak, 1.42, [0, 1, 2])[1], atol=1e-6)
    assert torch.allclose(out[1, 3:], v_main[1, 3:]) and not torch.allclose(out[1, :3], v_main[1, :3], atol=1e-3)


def test_composes_with_cfg(tiny_dit):
    # AutoGuidance on top of a CFG-guided main model: the guided field is just another denoise_fn.
    main, weak = tiny_dit(), tiny_dit(depth=1)
    x, t, y = torch.randn(2, 8, 8, 8), torch.full((2,), 0.5), torch.tensor([1, 2])
    both = guided(cfg(main, y, 2.0), lambda x, t: weak(x, t, y), 1.5)(x, t)
    v_cfg = combine(main(x, t, y), main(x, t, torch.full_like(y, 10)), 2.0)
    assert torch.allclose(both, combine(v_cfg, weak(x, t, y), 1.5), atol=1e-5)


def test_models_in_training_mode_are_refused(tiny_dit):
    main, weak = tiny_dit(), tiny_dit()
    weak.train()
    with pytest.raises(ValueError, match="guide_model"):
        autoguidance(main, weak, torch.tensor([1]), 1.42)
