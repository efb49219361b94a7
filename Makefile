# `make install` builds .venv from nothing; `make test` runs the suite; `make demo` runs the
# whole pipeline on synthetic data (CPU: under 10 minutes; uses the GPU when there is one); `make demo-sfd` SFD on it.
PYTHON ?= python3
PY := .venv/bin/python
DEMO := runs/demo

.PHONY: install test matrix demo demo-vavae demo-sfd demo-fae demo-rae demo-wit clean

install: .venv/.installed

# Installs the dependencies named in pyproject.toml, not the project itself: an installed
# top-level `tokenizers` would collide with Hugging Face's. Commands run from the repo root.
.venv/.installed: pyproject.toml
	$(PYTHON) -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > .venv/requirements.txt
	$(PY) -m pip install --quiet -r .venv/requirements.txt
	touch $@

test: install
	$(PY) -m pytest

# The README's tokenizer x generator table, rebuilt from the registries (tools/matrix.py; no weights needed).
matrix: install
	$(PY) tools/matrix.py --write

# The README's commands, end to end on the synthetic set (configs/preset/demo.yaml).
demo: demo-vavae
	$(PY) -m generators.train --latent demo preset=demo
	$(PY) -m generators.sample --run $(DEMO)/generator --num 300 --out $(DEMO)/samples_guided.npz
	$(PY) -m generators.sample --run $(DEMO)/generator --num 300 --out $(DEMO)/samples_unguided.npz sample.cfg_scale=1.0
	$(PY) -m generators.sample --run $(DEMO)/generator --num 300 --out $(DEMO)/samples_ig.npz sample.cfg_scale=1.0 sample.ig_scale=1.7
	$(PY) -m generators.sample --run $(DEMO)/generator --num 300 --out $(DEMO)/samples_ig_guided.npz sample.ig_scale=1.4
	$(PY) -m eval.demo_report --tokenizer-run $(DEMO)/vavae --generator-run $(DEMO)/generator \
		--samples guided=$(DEMO)/samples_guided.npz --samples unguided=$(DEMO)/samples_unguided.npz \
		--samples ig=$(DEMO)/samples_ig.npz --samples ig_cfg=$(DEMO)/samples_ig_guided.npz --out $(DEMO)/report.html
	@echo "report: $(DEMO)/report.html"

# The demo's tiny VA-VAE and its store of the synthetic set (both resume, or return at once when finished).
demo-vavae: install
	$(PY) -m tokenizers.train vavae preset=demo
	$(PY) -m latents.extract --tokenizer $(DEMO)/vavae/tokenizer --data synthetic --out $(DEMO)/latents.zarr

# SFD on the demo's VA-VAE store (texture) and a tiny SemVAE's store (semantic), trained twice: semantics ahead by
# delta 0.3, and on one clock (delta 0); the report compares their samples' class accuracy (configs/preset/demo.yaml).
demo-sfd: demo-vavae
	$(PY) -m tokenizers.train semvae preset=demo
	$(PY) -m latents.extract --tokenizer $(DEMO)/semvae/tokenizer --data synthetic --out $(DEMO)/semantic.zarr \
		--sample-posterior --noise-seed 1
	$(PY) -m generators.train --latent sfd preset=demo
	$(PY) -m generators.train --latent sfd preset=demo model.options.semfirst_delta_t=0.0 run.dir=$(DEMO)/sfd_dt0
	$(PY) -m generators.sample --run $(DEMO)/sfd --num 300 --out $(DEMO)/sfd_dt0.3.npz
	$(PY) -m generators.sample --run $(DEMO)/sfd --num 300 --out $(DEMO)/sfd_dt0.3_cfg.npz sample.cfg_scale=4.0
	$(PY) -m generators.sample --run $(DEMO)/sfd_dt0 --num 300 --out $(DEMO)/sfd_dt0.npz
	$(PY) -m generators.sample --run $(DEMO)/sfd_dt0 --num 300 --out $(DEMO)/sfd_dt0_cfg.npz sample.cfg_scale=4.0
	$(PY) -m eval.demo_report --title "latentkit SFD demo" --pipeline "tiny VA-VAE + tiny SemVAE &rarr; composite \
		latent store &rarr; tiny SFD LightningDiT" --tokenizer-run $(DEMO)/vavae --generator-run $(DEMO)/sfd \
		--generator-run $(DEMO)/sfd_dt0 --samples dt0.3=$(DEMO)/sfd_dt0.3.npz --samples dt0=$(DEMO)/sfd_dt0.npz \
		--samples dt0.3_cfg4=$(DEMO)/sfd_dt0.3_cfg.npz --samples dt0_cfg4=$(DEMO)/sfd_dt0_cfg.npz \
		--out $(DEMO)/sfd_report.html
	@echo "report: $(DEMO)/sfd_report.html"

# FAE's three tokenizer stages on a random DINOv2-B cut to one block, its store, a tiny LightningDiT with FAE's recipe
# (time shift 0.4), 300 samples by Euler-Maruyama without CFG and by Euler with the three-part CFG, and a report with
# each stage's first and last evaluation (configs/preset/demo.yaml).
demo-fae: install
	$(PY) -m tokenizers.train fae stage=feature preset=demo
	$(PY) -m tokenizers.train fae stage=pixel preset=demo
	$(PY) -m tokenizers.train fae stage=finetune preset=demo
	$(PY) -m latents.extract --tokenizer $(DEMO)/fae_finetune/tokenizer --data synthetic --out $(DEMO)/fae.zarr
	$(PY) -m generators.train --latent fae_dino preset=demo
	$(PY) -m generators.sample --run $(DEMO)/fae_generator --num 300 --out $(DEMO)/fae_em.npz
	$(PY) -m generators.sample --run $(DEMO)/fae_generator --num 300 --out $(DEMO)/fae_cfg.npz sample.method=euler \
		'sample.cfg_schedule=[[0,0.1,0.9],[0.3,1,2.5]]'
	$(PY) -m eval.demo_report --title "latentkit FAE demo" --pipeline "tiny FAE (stages feature, pixel, finetune) \
		&rarr; latent store &rarr; tiny LightningDiT (FAE's recipe)" --tokenizer-run $(DEMO)/fae_finetune \
		--generator-run $(DEMO)/fae_generator --stage-run feature=$(DEMO)/fae_feature \
		--stage-run pixel=$(DEMO)/fae_pixel --stage-run finetune=$(DEMO)/fae_finetune \
		--samples euler_maruyama=$(DEMO)/fae_em.npz --samples three_part_cfg=$(DEMO)/fae_cfg.npz \
		--out $(DEMO)/fae_report.html
	@echo "report: $(DEMO)/fae_report.html"

# JiT and WiT on the synthetic 64 px images themselves, no tokenizer (configs/preset/demo.yaml): WiT's waypoint PCA
# of a random DINOv3-S cut to one block (written once), a tiny JiT, WiT's W_psi (stage A) and a tiny WiT on it
# (stage B), 300 CFG samples of each by 20 Heun intervals, and a report with their class accuracy.
demo-wit: install
	[ -f $(DEMO)/wit_pca.safetensors ] || $(PY) -m latents.waypoints --data synthetic --encoder dinov3_s --random-init \
		--depth 1 --num 500 --out $(DEMO)/wit_pca.safetensors
	$(PY) -m generators.train --pixels synthetic generator=jit_b16 preset=demo
	$(PY) -m generators.train --pixels synthetic generator=wit_waypoints preset=demo
	$(PY) -m generators.train --pixels synthetic generator=wit_b16 preset=demo
	$(PY) -m generators.sample --run $(DEMO)/jit --num 300 --out $(DEMO)/jit_samples.npz
	$(PY) -m generators.sample --run $(DEMO)/wit --num 300 --out $(DEMO)/wit_samples.npz
	$(PY) -m eval.demo_report --title "latentkit JiT / WiT demo" --pipeline "tiny JiT, and tiny WiT on its W_psi \
		(no tokenizer: pixels)" --generator-run $(DEMO)/jit --generator-run $(DEMO)/wit_waypoints \
		--generator-run $(DEMO)/wit --samples jit=$(DEMO)/jit_samples.npz --samples wit=$(DEMO)/wit_samples.npz \
		--out $(DEMO)/wit_report.html
	@echo "report: $(DEMO)/wit_report.html"

# RAE demos (configs/preset/demo.yaml): for each frozen encoder (random weights of the real ViT-B; RAEv2's DINOv3-L k7
# narrowed), a tiny decoder, a store of 500 synthetic images, a tiny DiT^DH (RAEv2: DiTwDDTHeadIG) and 100 samples.
# `make demo-rae-siglip2_b` runs one.
rae_latent_dinov2_b := rae_dino
rae_latent_siglip2_b := rae_siglip
rae_latent_mae_b := rae_mae
rae_latent_dinov3_l_k7 := rae_dinov3

demo-rae: demo-rae-dinov2_b demo-rae-siglip2_b demo-rae-mae_b demo-rae-dinov3_l_k7

demo-rae-%: install
	$(PY) -m tokenizers.train rae encoder=$* preset=demo
	$(PY) -m latents.extract --tokenizer $(DEMO)/rae_$*/tokenizer --data synthetic --out $(DEMO)/$(rae_latent_$*).zarr \
		--stats element --no-mean data.num_images=500
	$(PY) -m generators.train --latent $(rae_latent_$*) preset=demo
	$(PY) -m generators.sample --run $(DEMO)/$(rae_latent_$*)_ditdh --num 100 --out $(DEMO)/$(rae_latent_$*)_samples.npz
	@echo "grids: $(DEMO)/rae_$*/samples $(DEMO)/$(rae_latent_$*)_ditdh/samples $(DEMO)/$(rae_latent_$*)_samples.png"

# RAEv2 (its own rule, not the pattern's): a random DINOv3-L k7 narrowed to 64 wide (all 24 blocks; the full width
# would be 300M random parameters), statistics WITH a mean as RAEv2's, and its tiny DiTwDDTHeadIG (ditdh_ig_xl section).
demo-rae-dinov3_l_k7: install
	$(PY) -m tokenizers.train rae encoder=dinov3_l_k7 preset=demo 'model.encoder_size={embed_dim: 64, num_heads: 2}'
	$(PY) -m latents.extract --tokenizer $(DEMO)/rae_dinov3_l_k7/tokenizer --data synthetic \
		--out $(DEMO)/$(rae_latent_dinov3_l_k7).zarr --stats element data.num_images=500
	$(PY) -m generators.train --latent $(rae_latent_dinov3_l_k7) preset=demo
	$(PY) -m generators.sample --run $(DEMO)/$(rae_latent_dinov3_l_k7)_ditdh_ig --num 100 \
		--out $(DEMO)/$(rae_latent_dinov3_l_k7)_samples.npz
	@echo "grids: $(DEMO)/rae_dinov3_l_k7/samples $(DEMO)/$(rae_latent_dinov3_l_k7)_ditdh_ig/samples $(DEMO)/$(rae_latent_dinov3_l_k7)_samples.png"

clean:
	rm -rf runs .pytest_cache
