# funchat: the two commands a new user needs are `make run` and `make test`.
# Every target sets up what it needs itself (apt packages where missing, the .venv, the package).

SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
CHECKPOINT ?= checkpoints/tiny
INPUT_WAV ?= $(SHARED)/data/fun-audio-chat-example-16k-f32.wav
RUN_DIR := .run
# Debian packages the project needs at run or test time: redis-server holds the sessions; prometheus
# scrapes the stack in the telemetry test; espeak-ng synthesises utterances for the load test;
# chromium (headless) runs the web page against the stack in its test.
APT_PACKAGES ?= redis-server prometheus espeak-ng chromium

GRPC_PORT ?= 50051
HTTP_PORT ?= 8000

.PHONY: setup apt run up down test test-unit bench-model bench-vocoder bench-triton bench-e2e bench-gpu bench-latency bench-realtime bench-tracing loadtest soak restart triton-up triton-down clean help images base-image k8s deploy-images deploy-test

help:
	@echo "make run          set up, start everything, a two-turn conversation through the public API, stop"
	@echo "make up           start redis-server, the Triton model services and the orchestrator (gRPC 127.0.0.1:$(GRPC_PORT), Realtime WebSocket and web page 127.0.0.1:$(HTTP_PORT))"
	@echo "make down         stop them"
	@echo "make restart SERVICE=redis|audio_tokenizer|llm|refined_head|vocoder|orchestrator  restart one part of the running stack on the same ports"
	@echo "make test         set up and run the whole test suite"
	@echo "make bench-model  time each model stage (tiny and mid presets, CPU); table + JSON"
	@echo "make bench-vocoder  vocoder real-time factor, first-chunk latency, cost per chunk along a long call"
	@echo "make bench-triton each Triton model service vs the same module in process (1/4/16 calls)"
	@echo "make bench-e2e    first audio and real-time factor through the public API at 1/2/4/8 calls vs the oracle"
	@echo "make bench-latency  first audio against history turns (kept prefixes vs whole prompts) and caller turn length"
	@echo "make bench-realtime  first audio through the Realtime WebSocket (the openai SDK) against through gRPC, the same turn"
	@echo "make bench-gpu    the engines at 8B shapes on one GPU (llm/SRH steps, vocoder, first audio, tier capacity); DEVICE=cpu: tiny smoke run"
	@echo "make bench-tracing  first audio with tracing on vs off (calls alternating, one stack exporting to a local OTLP receiver)"
	@echo "make soak         CALLS= live duplex calls for MINUTES= against the stack, memory of every process sampled; 0 errors and flat memory or it fails"
	@echo "make loadtest     Locust against make up (or HOST=host:port): USERS= DURATION= SHAPE=steady|step|spike, SLOs; .run/loadtest/"
	@echo "make triton-up    start one tritonserver per model service on 127.0.0.1 (.run/endpoints.json)"
	@echo "make triton-down  stop them"
	@echo "make images       build the orchestrator and model-services images (podman or docker; services/README.md)"
	@echo "make base-image   a local Debian 12 base image (debootstrap + podman import) where no registry is reachable"
	@echo "make deploy-images  the orchestrator, model-services and redis images on that local base"
	@echo "make deploy-test  the Helm chart (dev-cpu) run with podman kube play: probes, a greedy turn equal to the oracle, teardown"
	@echo "make k8s          k8s/: plain manifests and kustomize overlays rendered from helm/funchat (never edit them by hand)"

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The venv is refreshed only when what the install reads changes (stamp file), so `make setup` is
# idempotent. Installing the package also generates the public API's Python code (funchat/v1/,
# git-ignored) from protos/ (setup.py), so a changed .proto reinstalls too.
INSTALL_INPUTS := pyproject.toml setup.py MANIFEST.in protos/funchat/v1/funchat.proto
# A checkout whose generated code is gone (funchat/v1 deleted, the venv kept) reinstalls as well.
ifeq ($(wildcard funchat/v1/funchat_pb2.py),)
INSTALL_INPUTS += FORCE
endif
$(VENV)/.stamp: $(INSTALL_INPUTS)
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[all,test]"
	@touch $@

setup: apt $(VENV)/.stamp

FORCE:

$(CHECKPOINT)/vocoder/model.safetensors: | setup
	$(VENV)/bin/funchat init-checkpoint --preset tiny --out $(CHECKPOINT) --seed 0

# The main job: the whole cluster on 127.0.0.1, a scripted two-turn call through the public API, then stop.
run: setup $(CHECKPOINT)/vocoder/model.safetensors
	@mkdir -p $(RUN_DIR)
	$(MAKE) --no-print-directory up
	$(PY) -m funchat.dev.demo --server 127.0.0.1:$(GRPC_PORT) --input $(INPUT_WAV) --out $(RUN_DIR); \
	    rc=$$?; $(MAKE) --no-print-directory down; exit $$rc

up: setup $(CHECKPOINT)/vocoder/model.safetensors
	$(PY) -m funchat.dev.stack up --checkpoint $(CHECKPOINT) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT)

down: setup
	$(PY) -m funchat.dev.stack down

# One part of the stack `make up` runs, stopped (or found crashed) and started again on the same ports
# with the same settings; returns when it is ready (funchat/dev/stack.py, "restart").
restart: setup
	@test -n "$(SERVICE)" || { echo "usage: make restart SERVICE=redis|audio_tokenizer|llm|refined_head|vocoder|orchestrator" >&2; exit 2; }
	$(PY) -m funchat.dev.stack restart $(SERVICE)

# tests/deploy runs the chart in containers: it needs the images (deploy-images). The 20 slowest
# tests are listed at the end (the suite's budget is 30 minutes on 2 cores).
test: setup deploy-images
	FUNCHAT_SHARED=$(abspath $(SHARED)) CONTAINERS_CONF="$(IMAGES_CONTAINERS_CONF)" $(PY) -m pytest -q --durations=20 tests

test-unit: setup
	FUNCHAT_SHARED=$(abspath $(SHARED)) $(PY) -m pytest -q tests/unit

bench-model: setup
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.model --presets tiny mid --json bench-results/bench-model.json

bench-vocoder: setup
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.vocoder --json bench-results/bench-vocoder.json

bench-triton: setup
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.triton --json bench-results/bench-triton.json

bench-e2e: setup $(CHECKPOINT)/vocoder/model.safetensors
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.e2e --checkpoint $(CHECKPOINT) --input $(INPUT_WAV) --json bench-results/bench-e2e.json

bench-latency: setup $(CHECKPOINT)/vocoder/model.safetensors
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.latency --checkpoint $(CHECKPOINT) --input $(INPUT_WAV) --json bench-results/bench-latency.json

bench-realtime: setup $(CHECKPOINT)/vocoder/model.safetensors
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.realtime --checkpoint $(CHECKPOINT) --input $(INPUT_WAV) --json bench-results/bench-realtime.json

# On a GPU machine: python3 -m funchat.benchmarks.gpu needs only torch, numpy, safetensors, tokenizers,
# pyyaml and opentelemetry-sdk (README "Benchmarks" says how it was run on an H200).
DEVICE ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
bench-gpu: setup
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.gpu --device $(DEVICE) --json bench-results/bench-gpu.json

bench-tracing: setup $(CHECKPOINT)/vocoder/model.safetensors
	@mkdir -p bench-results
	$(PY) -m funchat.benchmarks.tracing_cost --checkpoint $(CHECKPOINT) --input $(INPUT_WAV) --json bench-results/bench-tracing.json

# Locust, headless, against the running stack (.run/endpoints.json) or HOST=host:port (loadtests/README.md):
# live Converse callers and one-shot Respond callers; Locust's CSV files and HTML report, summary.json
# and plot.png in .run/loadtest/; the exit code is the SLO verdict. More options: LOADTEST_ARGS="--turns 3".
USERS ?= 2
DURATION ?= 60
SHAPE ?= steady
FIRST_AUDIO_P95_MS ?= 1000
MAX_UNDERRUN_TURNS ?= 0
MAX_ERROR_RATE ?= 0
LOADTEST_ARGS ?=
loadtest: setup
	@$(PY) loadtests/run.py $(if $(HOST),--host $(HOST)) --users $(USERS) --duration $(DURATION) --shape $(SHAPE) \
	    --first-audio-p95-ms $(FIRST_AUDIO_P95_MS) --max-underrun-turns $(MAX_UNDERRUN_TURNS) \
	    --max-error-rate $(MAX_ERROR_RATE) --out $(RUN_DIR)/loadtest -- \
	    --recording "$(if $(wildcard $(INPUT_WAV)),$(abspath $(INPUT_WAV)))" $(LOADTEST_ARGS)

# The soak (funchat/dev/soak.py): the stack `make up` runs (started here when none runs, then stopped),
# CALLS callers placing live duplex calls for MINUTES; table + bench-results/soak.json; the exit code
# is the verdict (no error, no process whose memory keeps growing: MAX_SLOPE MB per minute).
CALLS ?= 4
MINUTES ?= 10
MAX_SLOPE ?= 1.0
soak: setup $(CHECKPOINT)/vocoder/model.safetensors
	@mkdir -p bench-results
	$(PY) -m funchat.dev.soak --calls $(CALLS) --minutes $(MINUTES) --max-slope-mb-per-min $(MAX_SLOPE) \
	    --start-stack --stack-arg=--checkpoint=$(CHECKPOINT) --stack-arg=--grpc-port=$(GRPC_PORT) \
	    $(if $(wildcard $(INPUT_WAV)),--recording $(abspath $(INPUT_WAV))) --json bench-results/soak.json

triton-up: setup $(CHECKPOINT)/vocoder/model.safetensors
	$(PY) -m funchat.dev.tritonserver up --checkpoint $(CHECKPOINT)

triton-down: setup
	$(PY) -m funchat.dev.tritonserver down

# k8s/base and k8s/overlays/*: the chart rendered for users without Helm (funchat/dev/render_k8s.py;
# tests/unit/test_k8s_manifests.py fails when they are stale).
k8s: setup
	$(PY) -m funchat.dev.render_k8s

clean:
	rm -rf $(RUN_DIR) checkpoints bench-results .pytest_cache

# Images (services/README.md, "Images"): podman where present, else docker (TORCH_INDEX_URL, IMAGE_PREFIX,
# IMAGE_TAG: services/build-images.sh). BASE_IMAGE / ORCH_BASE_IMAGE
# empty: each Dockerfile's default (NVIDIA's Triton image, Ray's image). Where no registry is reachable:
#   make base-image && make images BASE_IMAGE=localhost/debian-base:bookworm ORCH_BASE_IMAGE=localhost/debian-base:bookworm
# iptables: netavark sets up the podman networks' firewall rules with it
CONTAINER_APT_PACKAGES ?= podman runc netavark aardvark-dns debootstrap iptables
BASE_IMAGE ?=
ORCH_BASE_IMAGE ?=
LOCAL_BASE_IMAGE ?= localhost/debian-base:bookworm
IMAGES ?= orchestrator model-services
# the project-local podman configuration (only these two targets use it)
IMAGES_CONTAINERS_CONF ?= $(abspath services/containers.conf)

images:
	@# podman where present; docker where its daemon answers; else podman from apt
	@if ! command -v podman >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory apt APT_PACKAGES="$(CONTAINER_APT_PACKAGES)"; fi
	CONTAINERS_CONF="$(IMAGES_CONTAINERS_CONF)" BASE_IMAGE="$(BASE_IMAGE)" ORCH_BASE_IMAGE="$(ORCH_BASE_IMAGE)" services/build-images.sh $(IMAGES)

base-image:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(CONTAINER_APT_PACKAGES)"
	CONTAINERS_CONF="$(IMAGES_CONTAINERS_CONF)" services/build-local-base.sh $(LOCAL_BASE_IMAGE)

# The three images the chart's dev-cpu profile runs, built here on the local Debian base (layers
# cached: after a source change only the package layers are rebuilt, ~1 min).
deploy-images: setup base-image
	$(MAKE) --no-print-directory images BASE_IMAGE=$(LOCAL_BASE_IMAGE) ORCH_BASE_IMAGE=$(LOCAL_BASE_IMAGE) \
	    IMAGES="orchestrator model-services redis"

# The chart really run: rendered with values-dev-cpu.yaml, played with podman kube play, ready through
# its own probes, one greedy turn through the public API equal to the oracle's, torn down
# (tests/deploy; funchat/dev/podman_deploy.py). `make test` runs it too.
deploy-test: deploy-images
	FUNCHAT_SHARED=$(abspath $(SHARED)) CONTAINERS_CONF="$(IMAGES_CONTAINERS_CONF)" $(PY) -m pytest -q -s tests/deploy
