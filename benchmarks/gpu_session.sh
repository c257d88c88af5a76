#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 6, in the order they matter, each time-boxed.
#
#   bash benchmarks/gpu_session.sh smoke   # GPU tests and the quick benchmark (~1.5 min)
#   bash benchmarks/gpu_session.sh full    # GPU tests, speed matrix, meta-batch sweep + PNG, memory vs
#                                          # inner steps (~7 min)
#   bash benchmarks/gpu_session.sh fit     # quickstart meta-training, eager vs --model.cuda_graph (~2 min)
#   bash benchmarks/gpu_session.sh target  # only the issue-6 target case, 84x84x3 1-shot T=32, exact fp32
#                                          # and TF32 for every implementation alike (~6 min)
#   bash benchmarks/gpu_session.sh real    # issue 16: second-order MAML from the pre-training on ResNet-12
#                                          # (32-64-128-256), R1 and R2 side by side; $DATA (default gpudata)
#                                          # is a copy of ../shared/data carried to the machine (~8 min box)
#
# Results go to $OUT (default runs/gpu): log.txt, results.tgz (every JSON) and tasks_per_s.png.
# Where .whl/ holds wheels (monai, pydicom, nibabel, higher, torchopt with its optree and graphviz),
# they are installed first into /tmp/site, for a machine whose Python lacks them (without graphviz,
# TorchOpt is skipped).
set -u
stage=${1:?smoke or full}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" "$OUT/json"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PWD:/tmp/site
fi
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/log.txt"; }
run() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"; echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"; }
speed() { run "$1" python3 benchmarks/maml_speed.py --device cuda "${@:2}"; }
PEERS="higher torchopt"
GRAPH="medmeta-vmap-graph medmeta-vmap-bf16-graph"

case $stage in
smoke)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
    run 60 python3 -c "import torch, medmeta.algorithms; print(torch.__version__, torch.cuda.get_device_name())"
    run 120 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/algorithms
    speed 45 --quick
    ;;
full)
    ALL="medmeta-loop medmeta-vmap medmeta-vmap-graph medmeta-loop-graph medmeta-vmap-bf16-graph $PEERS"
    run 50 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/algorithms
    speed 100 --cases 84x84x3 1s15q --repeats 3 --warmup 1 --implementations $ALL --json "$OUT/json/84-1shot.json"
    speed 60 --cases 28x28x1 --repeats 3 --warmup 1 --implementations $ALL --json "$OUT/json/28.json"
    speed 25 --cases 3d --repeats 3 --warmup 1 --implementations $ALL --json "$OUT/json/3d.json"
    speed 60 --cases 84x84x3 5s15q --repeats 2 --warmup 1 --implementations $ALL --json "$OUT/json/84-5shot.json"
    speed 60 --cases none --sweep 1 2 4 8 16 32 --repeats 2 --warmup 1 \
        --implementations medmeta-loop medmeta-vmap-graph medmeta-loop-graph $PEERS --json "$OUT/json/sweep.json" \
        --plot "$OUT/tasks_per_s.png"
    for steps in 1 10 20; do
        speed 15 --cases 28x28x1 5s15q-T4 --inner-steps "$steps" --repeats 2 --warmup 1 \
            --implementations medmeta-loop medmeta-checkpoint medmeta-vmap --json "$OUT/json/steps$steps.json"
    done
    ;;
target)
    TARGET="medmeta-vmap-graph medmeta-loop-graph medmeta-vmap-bf16-graph medmeta-vmap torchopt higher"
    speed 240 --cases 84x84x3 1s15q-T32 --repeats 3 --warmup 1 --implementations $TARGET --json "$OUT/json/target.json"
    speed 120 --cases 84x84x3 1s15q-T32 --repeats 3 --warmup 1 --tf32 --implementations $TARGET \
        --json "$OUT/json/target-tf32.json"
    ;;
real)
    # The rows that did not fit the CPU budget: the pre-training, MAML's 150 meta-steps from it, and its weights at 20
    # test steps (configs/real_data_maml.yaml's setting); the Conv-4 rows to compare with are in BENCHMARKS.md.
    # SIGINT at the box's end: real_data.py then stops its runs and keeps the finished rows (SIGTERM would orphan them)
    run 480 timeout --signal=INT --kill-after=45 420 python3 benchmarks/real_data.py --data "${DATA:-gpudata}" \
        --protocols R1 R2 --shots 5 --steps 300 --val-episodes 50 --test-episodes 600 --jobs 2 --backbone resnet12 \
        --algorithms maml_init maml_init_steps20 --out /tmp/real
    mkdir -p "$OUT/json/real" && cp -r /tmp/real/results /tmp/real/*.md /tmp/real/*.json "$OUT/json/real/"  # no checkpoints
    ;;
fit)
    # Meta-training only (no validation or test): the quickstart's 5-way 1-shot, 32x32, T=4.
    export MEDMETA_CACHE=/tmp/medmeta-cache
    fit() { run 60 python3 -c "import sys; from medmeta.cli import main; sys.exit(main())" fit \
        --config configs/quickstart.yaml --trainer.accelerator "${ACCELERATOR:-gpu}" --trainer.callbacks null \
        --trainer.limit_val_batches 0 --test_after_fit false "$@"; }
    fit --trainer.max_steps 2  # generates the synthetic data set; warms up
    for graph in false true; do
        start=$EPOCHREALTIME
        fit --trainer.max_steps 300 --model.cuda_graph $graph
        log "quickstart meta-training, 300 steps, cuda_graph=$graph: $(awk "BEGIN {print $EPOCHREALTIME - $start}") s wall"
    done
    ;;
esac
tar czf "$OUT/results.tgz" -C "$OUT" json && rm -rf "$OUT/json"
