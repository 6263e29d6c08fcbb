#!/usr/bin/env bash
# Build TensorRT plans from the shared LLM's ONNX graphs (funchat.engines.onnx_export) with trtexec,
# and write a Triton model repository holding them (platform "tensorrt_plan").
#
# Run it on the GPU model the plans will serve on, with the TensorRT of the Triton image that will
# serve them (a plan only runs on the GPU architecture and TensorRT version that built it): e.g. in
# nvcr.io/nvidia/tensorrt:<yy.mm>-py3 of the same <yy.mm> as nvcr.io/nvidia/tritonserver:<yy.mm>-py3,
# TensorRT 10 (INT64 inputs). Needs bash and python3. Untested here (no TensorRT): see README.md.
#
#   services/tensorrt/build_engines.sh --onnx-dir build/llm_onnx --out build/llm_trt \
#       --prefill-batch 1:1:8 --step-batch 1:16:64 --seq 1:256:2048 --past 1:512:4096 [--fp16|--bf16]
#
# Output (a Triton model repository; pass it to tritonserver --model-repository):
#   OUT/llm_trt_prefill/{config.pbtxt,1/model.plan}
#   OUT/llm_trt_step/{config.pbtxt,1/model.plan}
#   each model folder also holds build.log (trtexec), build-info.txt (profiles) and llm_onnx.json
#   (the export's metadata); nothing else is written at the repository root, where Triton takes
#   every folder for a model.

set -euo pipefail

usage() {
    cat <<'EOF'
usage: build_engines.sh --onnx-dir DIR [options]

  --onnx-dir DIR          folder written by `python -m funchat.engines.onnx_export` (llm_prefill.onnx,
                          llm_step.onnx, llm_onnx.json, llm_weights.bin when external)
  --out DIR               Triton model repository to write (default: llm_trt)
  --prefill-batch A:B:C   min:opt:max rows of a prefill call            (default 1:1:8)
  --seq A:B:C             min:opt:max prompt positions T of a prefill   (default 1:256:2048)
  --step-batch A:B:C      min:opt:max rows of a step call               (default 1:16:64)
  --past A:B:C            min:opt:max cached positions S of a step      (default 1:512:4096)
  --fp16 | --bf16         weakly typed reduced precision (float32 ONNX only; I/O stays float32)
  --fp32                  no reduced precision (float32 ONNX)
  --strongly-typed        use the ONNX types as they are (the default for a float16 export)
  --workspace-mib N       builder workspace limit in MiB (--memPoolSize=workspace:N)
  --opt-level N           --builderOptimizationLevel (0..5, TensorRT default 3)
  --timing-cache FILE     load/save the builder timing cache (speeds up rebuilds)
  --instances N           instance_group count in the configs (default 1)
  --prefill-name NAME     Triton model name of the prefill plan (default llm_trt_prefill)
  --step-name NAME        Triton model name of the step plan (default llm_trt_step)
  --trtexec PATH          trtexec binary (default: $TRTEXEC, else trtexec on PATH, else
                          /usr/src/tensorrt/bin/trtexec)
  --trtexec-arg ARG       pass ARG to trtexec as is (repeatable)
  --config-only           write the config.pbtxt files only, run no trtexec
  --dry-run               print the trtexec commands and write the configs, build nothing
  -h, --help              this text
EOF
}

die() { echo "build_engines.sh: $*" >&2; exit 2; }

ONNX_DIR=""
OUT="llm_trt"
PREFILL_BATCH="1:1:8"
SEQ="1:256:2048"
STEP_BATCH="1:16:64"
PAST="1:512:4096"
PRECISION="auto"
WORKSPACE_MIB=""
OPT_LEVEL=""
TIMING_CACHE=""
INSTANCES=1
PREFILL_NAME="llm_trt_prefill"
STEP_NAME="llm_trt_step"
TRTEXEC_BIN="${TRTEXEC:-}"
EXTRA_ARGS=()
CONFIG_ONLY=0
DRY_RUN=0
PYTHON="${PYTHON:-python3}"

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    if [[ "$1" == --*=* ]]; then  # --flag=value -> --flag value
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
    fi
    case "$1" in
        --onnx-dir) need_value "$@"; ONNX_DIR="$2"; shift 2 ;;
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --prefill-batch) need_value "$@"; PREFILL_BATCH="$2"; shift 2 ;;
        --seq) need_value "$@"; SEQ="$2"; shift 2 ;;
        --step-batch) need_value "$@"; STEP_BATCH="$2"; shift 2 ;;
        --past) need_value "$@"; PAST="$2"; shift 2 ;;
        --fp16) PRECISION="fp16"; shift ;;
        --bf16) PRECISION="bf16"; shift ;;
        --fp32) PRECISION="fp32"; shift ;;
        --strongly-typed) PRECISION="typed"; shift ;;
        --workspace-mib) need_value "$@"; WORKSPACE_MIB="$2"; shift 2 ;;
        --opt-level) need_value "$@"; OPT_LEVEL="$2"; shift 2 ;;
        --timing-cache) need_value "$@"; TIMING_CACHE="$2"; shift 2 ;;
        --instances) need_value "$@"; INSTANCES="$2"; shift 2 ;;
        --prefill-name) need_value "$@"; PREFILL_NAME="$2"; shift 2 ;;
        --step-name) need_value "$@"; STEP_NAME="$2"; shift 2 ;;
        --trtexec) need_value "$@"; TRTEXEC_BIN="$2"; shift 2 ;;
        --trtexec-arg) need_value "$@"; EXTRA_ARGS+=("$2"); shift 2 ;;
        --config-only) CONFIG_ONLY=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ -n "$ONNX_DIR" ]] || { usage >&2; die "--onnx-dir is required"; }
META="$ONNX_DIR/llm_onnx.json"
[[ -f "$META" ]] || die "$META not found: export first with python -m funchat.engines.onnx_export"
for f in llm_prefill.onnx llm_step.onnx; do
    [[ -f "$ONNX_DIR/$f" ]] || die "$ONNX_DIR/$f not found"
done

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
for v in "$INSTANCES" ${WORKSPACE_MIB:+"$WORKSPACE_MIB"} ${OPT_LEVEL:+"$OPT_LEVEL"}; do
    is_uint "$v" || die "expected a non-negative integer, got '$v'"
done
INSTANCES=$((10#$INSTANCES))
[[ "$INSTANCES" -ge 1 ]] || die "--instances must be at least 1"
for name in "$PREFILL_NAME" "$STEP_NAME"; do
    [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad model name '$name'"
done

# "min:opt:max" -> three integers with 1 <= min <= opt <= max
split_range() {
    local flag="$1" spec="$2" a b c
    IFS=: read -r a b c <<<"$spec"
    if ! is_uint "${a:-x}" || ! is_uint "${b:-x}" || ! is_uint "${c:-x}" || [[ "$spec" != "$a:$b:$c" ]]; then
        die "$flag wants MIN:OPT:MAX (three integers), got '$spec'"
    fi
    a=$((10#$a)) b=$((10#$b)) c=$((10#$c))  # decimal even with leading zeros
    (( a >= 1 && a <= b && b <= c )) || die "$flag needs 1 <= min <= opt <= max, got '$spec'"
    echo "$a $b $c"
}
range="$(split_range --prefill-batch "$PREFILL_BATCH")" || exit 2
read -r PB_MIN PB_OPT PB_MAX <<<"$range"
range="$(split_range --seq "$SEQ")" || exit 2
read -r T_MIN T_OPT T_MAX <<<"$range"
range="$(split_range --step-batch "$STEP_BATCH")" || exit 2
read -r SB_MIN SB_OPT SB_MAX <<<"$range"
range="$(split_range --past "$PAST")" || exit 2
read -r S_MIN S_OPT S_MAX <<<"$range"

# Model sizes and dtypes from the export's metadata (validated: plain integers and known words).
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (needed to read $META; set PYTHON=...)"
META_VARS="$("$PYTHON" - "$META" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
cfg = meta["config"]
step_out = list(meta["graphs"]["step"]["outputs"])
values = {
    "DTYPE": meta["dtype"], "STEP_KV": meta.get("step_kv", "present"),
    "N_LAYERS": cfg["num_hidden_layers"], "N_KV": cfg["num_key_value_heads"], "HEAD_DIM": cfg["head_dim"],
    "HIDDEN": cfg["hidden_size"], "VOCAB": cfg["vocab_size"], "MAX_POS": cfg["max_position_embeddings"],
    "STEP_K_OUT": step_out[2], "STEP_V_OUT": step_out[3],
}
for k, v in values.items():
    print(f"{k}={v}")
PY
)" || die "could not read $META"
DTYPE="" STEP_KV="" N_LAYERS="" N_KV="" HEAD_DIM="" HIDDEN="" VOCAB="" MAX_POS="" STEP_K_OUT="" STEP_V_OUT=""
while IFS='=' read -r key value; do
    case "$key" in
        DTYPE|STEP_KV|STEP_K_OUT|STEP_V_OUT)
            [[ "$value" =~ ^[a-z0-9_]+$ ]] || die "bad $key '$value' in $META"
            printf -v "$key" '%s' "$value" ;;
        N_LAYERS|N_KV|HEAD_DIM|HIDDEN|VOCAB|MAX_POS)
            is_uint "$value" || die "bad $key '$value' in $META"
            printf -v "$key" '%s' "$value" ;;
        *) die "unexpected line in metadata: $key" ;;
    esac
done <<<"$META_VARS"

case "$DTYPE" in
    float32) TRITON_DT="TYPE_FP32" ;;
    float16) TRITON_DT="TYPE_FP16" ;;
    *) die "unsupported ONNX dtype '$DTYPE' in $META" ;;
esac
case "$STEP_KV" in
    present|new) ;;
    *) die "unsupported step_kv '$STEP_KV' in $META" ;;
esac

# Precision: a float16 export is built strongly typed (its float32 RMSNorm/softmax casts are kept);
# a float32 export is built as is, or weakly typed with --fp16/--bf16 (TensorRT picks per layer).
PRECISION_ARGS=()
case "$PRECISION:$DTYPE" in
    auto:float16|typed:*|fp16:float16) PRECISION_ARGS=(--stronglyTyped) ;;
    auto:float32|fp32:float32) PRECISION_ARGS=() ;;
    fp16:float32) PRECISION_ARGS=(--fp16) ;;
    bf16:float32) PRECISION_ARGS=(--bf16) ;;
    bf16:float16) die "--bf16 needs a float32 export (this one is float16): re-export with --dtype float32" ;;
    fp32:float16) die "--fp32 needs a float32 export (this one is float16)" ;;
    *) die "unsupported precision '$PRECISION' for a $DTYPE export" ;;
esac

if (( T_MAX > MAX_POS || S_MAX + 1 > MAX_POS )); then
    echo "build_engines.sh: warning: --seq/--past go beyond max_position_embeddings=$MAX_POS" >&2
fi

# Shapes (trtexec spec: name:AxBxC, comma-separated).
E="$HIDDEN" L="$N_LAYERS" K="$N_KV" D="$HEAD_DIM"
prefill_shapes() { local b="$1" t="$2"; echo "inputs_embeds:${b}x${t}x${E},lengths:${b}"; }
step_shapes() {
    local b="$1" s="$2"
    echo "inputs_embeds:${b}x1x${E},past_keys:${L}x${b}x${K}x${s}x${D},past_values:${L}x${b}x${K}x${s}x${D},past_lengths:${b}"
}

if [[ "$CONFIG_ONLY" -eq 0 && "$DRY_RUN" -eq 0 ]]; then
    if [[ -z "$TRTEXEC_BIN" ]]; then
        if command -v trtexec >/dev/null 2>&1; then
            TRTEXEC_BIN="$(command -v trtexec)"
        elif [[ -x /usr/src/tensorrt/bin/trtexec ]]; then
            TRTEXEC_BIN=/usr/src/tensorrt/bin/trtexec
        else
            die "trtexec not found: run inside NVIDIA's Triton/TensorRT image or pass --trtexec PATH"
        fi
    fi
    [[ -x "$TRTEXEC_BIN" ]] || command -v "$TRTEXEC_BIN" >/dev/null 2>&1 || die "trtexec '$TRTEXEC_BIN' is not executable"
fi
TRTEXEC_BIN="${TRTEXEC_BIN:-trtexec}"

mkdir -p "$OUT"

# build GRAPH ONNX_FILE MODEL_NAME MIN OPT MAX
build() {
    local graph="$1" onnx="$2" name="$3" min="$4" opt="$5" max="$6"
    local plan_dir="$OUT/$name/1" log="$OUT/$name/build.log"
    local cmd=("$TRTEXEC_BIN" "--onnx=$onnx" "--saveEngine=$plan_dir/model.plan.partial"
               "--minShapes=$min" "--optShapes=$opt" "--maxShapes=$max" "--skipInference")
    cmd+=(${PRECISION_ARGS[@]+"${PRECISION_ARGS[@]}"})
    if [[ -n "$WORKSPACE_MIB" ]]; then cmd+=("--memPoolSize=workspace:${WORKSPACE_MIB}M"); fi
    if [[ -n "$OPT_LEVEL" ]]; then cmd+=("--builderOptimizationLevel=$OPT_LEVEL"); fi
    if [[ -n "$TIMING_CACHE" ]]; then cmd+=("--timingCacheFile=$TIMING_CACHE"); fi
    cmd+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
    if [[ "$DRY_RUN" -eq 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    mkdir -p "$plan_dir"
    echo "building $graph plan -> $plan_dir/model.plan (log: $log)"
    printf '%q ' "${cmd[@]}" >"$log"
    echo >>"$log"
    if ! "${cmd[@]}" >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$plan_dir/model.plan.partial"
        die "trtexec failed for the $graph graph (full log: $log)"
    fi
    mv -f "$plan_dir/model.plan.partial" "$plan_dir/model.plan"
}

# tensor NAME TYPE DIMS -> one config.pbtxt input/output entry
tensor() { printf '  {\n    name: "%s"\n    data_type: %s\n    dims: [ %s ]\n  }' "$1" "$2" "$3"; }

write_config() {
    local name="$1" graph="$2"
    mkdir -p "$OUT/$name/1"
    {
        echo "# Generated by services/tensorrt/build_engines.sh from $META ($DTYPE, step_kv=$STEP_KV)."
        echo "# The batch is not the first axis of the KV cache ([L, B, K, S, d]), so Triton does no"
        echo "# batching here (max_batch_size 0): the llm service's engine forms the batch itself."
        echo "name: \"$name\""
        echo "platform: \"tensorrt_plan\""
        echo "max_batch_size: 0"
        echo "default_model_filename: \"model.plan\""
        echo "input ["
        if [[ "$graph" == prefill ]]; then
            tensor inputs_embeds "$TRITON_DT" "-1, -1, $E"; echo ","
            tensor lengths TYPE_INT64 "-1"; echo
        else
            tensor inputs_embeds "$TRITON_DT" "-1, 1, $E"; echo ","
            tensor past_keys "$TRITON_DT" "$L, -1, $K, -1, $D"; echo ","
            tensor past_values "$TRITON_DT" "$L, -1, $K, -1, $D"; echo ","
            tensor past_lengths TYPE_INT64 "-1"; echo
        fi
        echo "]"
        echo "output ["
        if [[ "$graph" == prefill ]]; then
            tensor logits_last TYPE_FP32 "-1, $VOCAB"; echo ","
            tensor hidden "$TRITON_DT" "-1, -1, $E"; echo ","
            tensor present_keys "$TRITON_DT" "$L, -1, $K, -1, $D"; echo ","
            tensor present_values "$TRITON_DT" "$L, -1, $K, -1, $D"; echo
        else
            local kv_time="-1"
            [[ "$STEP_KV" == new ]] && kv_time="1"
            tensor logits TYPE_FP32 "-1, $VOCAB"; echo ","
            tensor hidden "$TRITON_DT" "-1, 1, $E"; echo ","
            tensor "$STEP_K_OUT" "$TRITON_DT" "$L, -1, $K, $kv_time, $D"; echo ","
            tensor "$STEP_V_OUT" "$TRITON_DT" "$L, -1, $K, $kv_time, $D"; echo
        fi
        echo "]"
        echo "instance_group ["
        echo "  {"
        echo "    kind: KIND_GPU"
        echo "    count: $INSTANCES"
        echo "  }"
        echo "]"
        echo "version_policy: { latest: { num_versions: 1 } }"
    } >"$OUT/$name/config.pbtxt"
    if [[ "$(cd "$ONNX_DIR" && pwd -P)" != "$(cd "$OUT/$name" && pwd -P)" ]]; then
        cp "$META" "$OUT/$name/llm_onnx.json"
    fi
    {
        echo "onnx_dir=$ONNX_DIR dtype=$DTYPE step_kv=$STEP_KV precision=$PRECISION (${PRECISION_ARGS[*]:-as exported})"
        if [[ "$graph" == prefill ]]; then
            echo "prefill profile: batch $PB_MIN:$PB_OPT:$PB_MAX, seq $T_MIN:$T_OPT:$T_MAX"
        else
            echo "step profile: batch $SB_MIN:$SB_OPT:$SB_MAX, past $S_MIN:$S_OPT:$S_MAX"
        fi
    } >"$OUT/$name/build-info.txt"
    echo "wrote $OUT/$name/config.pbtxt"
}

if [[ "$CONFIG_ONLY" -eq 0 ]]; then
    build prefill "$ONNX_DIR/llm_prefill.onnx" "$PREFILL_NAME" \
        "$(prefill_shapes "$PB_MIN" "$T_MIN")" "$(prefill_shapes "$PB_OPT" "$T_OPT")" "$(prefill_shapes "$PB_MAX" "$T_MAX")"
    build step "$ONNX_DIR/llm_step.onnx" "$STEP_NAME" \
        "$(step_shapes "$SB_MIN" "$S_MIN")" "$(step_shapes "$SB_OPT" "$S_OPT")" "$(step_shapes "$SB_MAX" "$S_MAX")"
fi
write_config "$PREFILL_NAME" prefill
write_config "$STEP_NAME" step

echo "done: Triton model repository in $OUT ($PREFILL_NAME, $STEP_NAME)"
