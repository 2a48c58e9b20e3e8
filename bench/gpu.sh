#!/usr/bin/env bash
# The GPU checks in one script, for a machine with one CUDA GPU (README "GPU figures"):
#   0. tests/test_gpu.py          the branches' networks train and infer on the GPU
#   1. bench/ccgr.py              CCGR engine vs the naive reference, on the GPU
#   2. bench/train.py --device cuda   IS training step: plain PyTorch vs Ray Train use_gpu
#   3. bench/serve.py --device cuda   HTTP through Serve (replica num_gpus=1) vs direct forward
#   4. jobs/round.py on the demo with train.use_gpu=true (Ray Train on the GPU, Ray Data
#      SS/CCGR actors with num_gpus), for as long as the time left allows
# Each writes its JSON line or log under OUT; a check that fails or runs out of time does
# not stop the next. The project's dependencies must be importable (python3 -m pip install
# -e . does it; on a machine without registries put them on PYTHONPATH first).
#
#   bash bench/gpu.sh OUT [ROUND_SECONDS]
set -u
out=${1:?usage: bash bench/gpu.sh OUT [ROUND_SECONDS]}
round_s=${2:-300}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

nvidia-smi -L | tee "$out/gpu.txt"
$py -c "import torch, torchvision, ray, pycocotools, pyarrow; print('torch', torch.__version__,
'torchvision', torchvision.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$out/gpu.txt"

run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$out/$name.out" 2> "$out/$name.err"
  echo "[$name] exit $? after $((SECONDS - t0)) s: $(tail -c 2000 "$out/$name.out")"
}
run tests 120 $py -m pytest -q -p no:cacheprovider tests/test_gpu.py
run ccgr 90 $py bench/ccgr.py
run train 120 $py bench/train.py --device cuda --size 320 --batch 8 --steps 45 --images 32
run serve 120 $py bench/serve.py --device cuda --cpus 4 --size 320
run round "$round_s" $py jobs/round.py --config configs/demo.yaml --run-dir /tmp/gpu-demo \
  --set train.use_gpu=true --set train.num_workers=1 --set train.cpus_per_worker=4
tail -n 40 "$out/round.out"
