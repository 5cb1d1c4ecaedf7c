# DAS Explorer: `make run` opens the app, `make test` runs every test. Both set up
# whatever is missing first (virtual environment, requirements, Fashion-MNIST, Chromium),
# and take seconds when nothing changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
DEMO := assets/demo/fashion-mnist-das.safetensors
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Two cores here and in CI: keep torch/BLAS/numba threads x processes at 2.
THREADS := OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 NUMBA_NUM_THREADS=2
APT := DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0

.PHONY: run test setup setup-dev data browser demo-model check bench bench-quick bench-das bench-finegrained bench-finegrained-quick screenshots lint clean help

help:
	@echo "make run        set up if needed, then open the app on the embedded demo model"
	@echo "make test       set up if needed, then run static checks and the whole test suite"
	@echo "make demo-model retrain the embedded demo checkpoints (same seed, same result)"
	@echo "make bench      scale/speed benchmarks (bench/), results in bench/results/"
	@echo "make bench-das  the DAS benchmark on the embedded split (baseline vs + DAS, 3 seeds)"
	@echo "make bench-finegrained  DAS on emoji-styles (many classes, few images): 5 losses x 5 seeds,"
	@echo "                the why-variants, ablations, r_s x r_b grid; paired CIs into README (<= 2 h)"
	@echo "make screenshots retake the README's screenshots (headless Chromium, demo checkpoint)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

setup: $(RUNTIME_STAMP) data
setup-dev: $(DEV_STAMP) data browser

EMOJI_NPZ := data/emoji-styles/emoji-styles-64.npz
EMOJI_ASSETS := das_core/data/emoji_styles

# Fashion-MNIST from Debian's package where we can install it (root + apt); otherwise the
# library says so and falls back to scikit-learn's bundled digits. Then emoji-styles.
data: $(EMOJI_NPZ)
	@if ls $(FASHION_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1 || ls data/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(APT) install dataset-fashion-mnist >/dev/null 2>&1 || { $(APT) update >/dev/null 2>&1; $(APT) install dataset-fashion-mnist >/dev/null 2>&1; } \
	  || echo "warning: could not install dataset-fashion-mnist; DAS Explorer will fall back to digits"; \
	else echo "note: Fashion-MNIST is not installed (as root: apt-get install dataset-fashion-mnist); falling back to digits"; fi

# emoji-styles: npm ci of the pinned Iconify sets into data/emoji-styles/npm, rendered once at
# 64 px (about 100 s on 2 cores). Rebuilt only when the lock file, split or near-duplicate list
# changes; offline it says so and the tests that need it skip.
$(EMOJI_NPZ): $(EMOJI_ASSETS)/package-lock.json $(EMOJI_ASSETS)/split.json $(EMOJI_ASSETS)/near_duplicates.json | $(RUNTIME_STAMP)
	@$(THREADS) $(PY) -m das_core data download emoji-styles && touch $@ \
	  || echo "warning: emoji-styles could not be built (see above); tests that need it will skip"

# Headless Chromium for the browser tests, from Debian (never `playwright install`).
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Chromium (Debian packages chromium, chromium-driver) for the browser tests"; \
	  $(APT) install chromium chromium-driver >/dev/null 2>&1 || { $(APT) update >/dev/null 2>&1; $(APT) install chromium chromium-driver >/dev/null 2>&1; } \
	  || echo "warning: could not install chromium; browser tests will be skipped"; \
	else echo "note: chromium is not installed; browser tests will be skipped"; fi

$(DEMO): | $(RUNTIME_STAMP)
	$(MAKE) demo-model

demo-model: $(RUNTIME_STAMP) data
	$(THREADS) $(PY) -m das_core demo build

run: $(RUNTIME_STAMP) data $(DEMO)
	$(THREADS) $(PY) -m streamlit run streamlit_app.py

check: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy das_core

test: setup-dev $(DEMO)
	$(MAKE) --no-print-directory check
	$(THREADS) $(PY) -m pytest

bench: setup-dev
	$(THREADS) $(PY) bench/run_all.py

bench-quick: setup-dev
	$(THREADS) $(PY) bench/run_all.py --quick

bench-das: setup-dev
	$(THREADS) $(PY) bench/bench_das_training.py

# Issue 11: the fine-grained DAS benchmark (emoji-styles, cached EfficientNet-Lite0 activations,
# last layers trained on the CPU). One thread per process, two processes (main comparison; the
# why-variants, ablations and grid), then the paired statistics into README.md.
FINE := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) bench/bench_das_finegrained.py --lr 1e-3 --epochs 12 --threads 1
bench-finegrained: setup-dev
	$(FINE) --plan main --eval-every 12 --budget-minutes 110 & \
	  $(FINE) --plan why ablation grid --eval-every 3 --budget-minutes 110; wait
	$(PY) bench/summarise_finegrained.py

bench-finegrained-quick: setup-dev
	$(FINE) --quick
	$(PY) bench/summarise_finegrained.py --results bench/results/das_finegrained_quick.json --print

# One screenshot per page of the real app, on the demo checkpoint, into assets/screenshots/.
screenshots: setup-dev $(DEMO)
	DAS_UPDATE_SCREENSHOTS=1 $(THREADS) $(PY) -m pytest -q -p no:cacheprovider tests/test_browser.py -k readme_screenshot

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache tests/artifacts
