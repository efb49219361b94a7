"""DDT's recipe through the commands: a moments store sampled afresh at every load with REPA targets, the ddt_xl
config made tiny, then sampling with encoder sharing on DDT's last_step grid."""
import json

import numpy as np
import torch

from core.log import read_jsonl
from generators import sample as gsample
from generators import train as gtrain
from latents.extract import main as extract_main
from tokenizers.vavae import VAVAE

# DDT-XL/2's recipe (REPA at block 1 of a 2-block encoder; patch 2 on 4x4 latents: 2x2 tokens, the grid of a
# random DINOv2-B's features at 32 px).
TINY = ["generator=ddt_xl", "model.input_size=4", "model.in_channels=8", "model.num_classes=10", "model.repa_depth=1",
        "model.options={hidden_size: 32, num_blocks: 3, num_encoder_blocks: 2, num_groups: 2}",
        "train.repa.random_init=true", "train.global_batch=8", "train.lr=1e-3", "train.log_every=1", "train.ckpt_every=10",
        "train.sample_every=1000", "train.steps=10", "sample.steps=7", "sample.grid_per_class=1"]


def test_ddt_trains_on_fresh_posterior_samples_with_repa_and_samples_with_sharing(tmp_path, one_thread):
    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(tmp_path / "vae")
    extract_main(["--tokenizer", str(tmp_path / "vae"), "--data", "synthetic", "--workers", "0", "--out", str(tmp_path / "m.zarr"),
                  "--store-moments", "--features", "dinov2_b", "--features-random-init", "data.num_images=32",
                  "data.image_size=32"])
    (tmp_path / "lat.yaml").write_text(f"stores: [{tmp_path / 'm.zarr'}]\ntokenizer: {tmp_path / 'vae'}\nnormalization: none\n"
                                       "multiplier: 0.18215\nposterior: sample\nflips: false\ngenerator: ddt_xl\n")
    cfg, _ = gtrain.parse(["--latent", str(tmp_path / "lat.yaml"), *TINY])
    assert (cfg.model.family, cfg.sample.last_step, cfg.sample.cfg_interval_start, cfg.train.repa.weight) == ("ddt", 0.04, 0.3, 0.5)
    run = tmp_path / "run"
    gtrain.main(["--latent", str(tmp_path / "lat.yaml"), f"run.dir={run}", *TINY])
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(logged) == 10 and all(np.isfinite(r["repa"]) for r in logged)

    out = tmp_path / "shared.npz"
    gsample.main(["--run", str(run), "--num", "4", "--batch-size", "4", "--out", str(out), "sample.share.mode=uniform",
                  "sample.share.every=2"])
    record = json.loads(out.with_name("shared.npz.json").read_text())["sharing"]
    assert record["mode"] == "uniform" and record["schedule"] == [0, 2, 4]  # 6 evaluations on DDT's grid
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 32, 32, 3)
