#!/usr/bin/env bash
# The image classifiers' training and the image benchmark on the offline GPU machine.
#
# That machine has torch, transformers 5.17 (enough for ViT, DeiT and our ViM: the vision tests pass
# with it) and no Debian package: the Fashion-MNIST files travel recompressed with xz (26 MB, with
# the checkout under the 64 MiB cap; no wheels needed for the default methods).
#
#   scripts/vision_accelerator.sh data                  # here, once: out/fashion-mnist/*.xz
#   scripts/vision_accelerator.sh train [ARGS...]       # there (carry out/fashion-mnist, and out/vision-wheels
#                                                       #   with mambapy's wheel if the ViM may use it):
#                                                       #   scripts/train_vision.py --device cuda ARGS, one
#                                                       #   process per model of --models, side by side,
#                                                       #   stopped in time (state saved); the same call
#                                                       #   again on the still-warm machine resumes
#   scripts/vision_accelerator.sh benchmark [ARGS...]   # there (carry out/fashion-mnist, out/vision-models,
#                                                       #   out/vision-benchmark): benchmarks/vision.py --device cuda ARGS
#   scripts/vision_accelerator.sh wsss [ARGS...]        # there (carry out/fashion-mnist, out/vision-models for the
#                                                       #   ViT, out/wsss to resume): benchmarks/wsss.py --device cuda ARGS
#   (DEVICE=cpu runs any of them on the CPU instead)
#
# Each call copies out/vision-models (without state.pt) or out/vision-benchmark to $OUT/ as one tar
# file; unpack it here with `tar -C out -xf FILE`. Name out/vision-models in carry only when it is
# here (a carried path that is absent here is removed there); on a fresh machine carry it back.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-540}          # seconds of work per call: the device tool allows 600

case "${1:-}" in
data)
    mkdir -p out/fashion-mnist
    for f in /usr/share/datasets/fashion-mnist/*-ubyte.gz; do
        zcat "$f" | xz -9e -T1 > "out/fashion-mnist/$(basename "$f" .gz).xz"
    done
    ls -l out/fashion-mnist
    ;;
train|benchmark|wsss)
    what=$1; shift
    # wheels carried in out/vision-wheels (mambapy: the ViM's parallel scan while training)
    for wheel in out/vision-wheels/*.whl; do
        [ -f "$wheel" ] && python -m pip install -q --no-deps "$wheel" 2>&1 | grep -v "dependency conflicts" || true
    done
    export FASHION_MNIST_DIR="$PWD/out/fashion-mnist" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    status=0
    if [ "$what" = train ]; then
        # one process per model, side by side: the small models leave the GPU mostly idle, and the
        # data workers (the composites are drawn on the CPU) are shared out among them
        models=$(printf '%s\n' "$@" | sed -n '/^--models$/{n;p}' | tail -1)
        models=${models:-vit,deit,vim}
        count=$(echo "$models" | tr ',' '\n' | grep -c .)
        workers=$(( ($(nproc) - count) / count )); [ "$workers" -ge 1 ] || workers=1
        mkdir -p out/vision-models/logs
        # several GPUs: the models are dealt out to them in --models order (CUDA_VISIBLE_DEVICES)
        gpus=$(python -c "import torch; print(torch.cuda.device_count())")
        pids=(); index=0
        for model in ${models//,/ }; do
            if [ "$gpus" -gt 1 ]; then export CUDA_VISIBLE_DEVICES=$(( index % gpus )); fi
            index=$(( index + 1 ))
            timeout --signal=INT "$LIMIT" python scripts/train_vision.py --device "${DEVICE:-cuda}" --workers "$workers" "$@" \
                --models "$model" > "out/vision-models/logs/$model.log" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
        unset CUDA_VISIBLE_DEVICES
        for model in ${models//,/ }; do echo "== $model"; grep -v "^$model: step" "out/vision-models/logs/$model.log" \
            | tail -5; grep "^$model: step" "out/vision-models/logs/$model.log" | tail -2; done
        dir=vision-models
    elif [ "$what" = benchmark ]; then
        timeout --signal=INT "$LIMIT" python benchmarks/vision.py --device "${DEVICE:-cuda}" "$@" || status=$?
        dir=vision-benchmark
    else
        # each source's maps and row are cached under out/wsss: the same call again resumes
        timeout --signal=INT "$LIMIT" python benchmarks/wsss.py --device "${DEVICE:-cuda}" --out out/wsss --no-progress \
            "$@" || status=$?
        dir=wsss
    fi
        if [ -n "${OUT:-}" ] && [ -d "out/$dir" ]; then
        if [ "$dir" = vision-models ]; then
            # one file per model, its training state included (a model's state is under the device tool's
            # 16 MiB a file): a stopped run resumes on a fresh machine with out/vision-models carried back
            for model in out/vision-models/*/; do
                name=$(basename "$model"); [ "$name" = logs ] && continue
                tar -C out -cf "$OUT/vision-models-$name.tar" "vision-models/$name" "vision-models/logs/$name.log"
            done
        elif [ "$dir" = wsss ]; then
            # the table and rows; the cached maps (hundreds of MB) stay there for a resumed call
            tar -C out -czf "$OUT/wsss.tar.gz" --exclude=wsss/maps wsss
        else
            tar -C out -cf "$OUT/$dir.tar" "$dir"
        fi
    fi
    echo "exit status $status (124 or 130: stopped after $LIMIT s; run the same command again to continue)"
    ;;
*)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
