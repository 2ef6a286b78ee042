# One device call (`run` with carry ['.whl']): environment, wheels, the GPU checks, then the CPU checks pinned to 2 physical cores
# with the GPU hidden. `python3 dev/device_check.py first` (same pinning) times the first call of fresh processes.
# The device image has torch, onnxruntime, pandas and pyarrow, not fastai: fill .whl/ (ignored by git) first with cp312 wheels
# (pip download --no-deps --python-version 3.12 --platform manylinux...) of fastai 2.8.12, fastcore, fasttransform, fastdownload,
# plum-dispatch, beartype, openvino, openvino-telemetry, and fastprogress 1.0.3 (1.1 imports fasthtml, which is not there).
nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\)|Core\(s\)"; grep -o -E "avx512_bf16|amx_bf16|avx512f|avx2" /proc/cpuinfo | sort | uniq -c
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD FASTINFER_CACHE=/tmp/fic PYTHONUNBUFFERED=1
python3 -c "import fastai, onnxruntime, openvino, torch, fastinfer.all; print('fastai', fastai.__version__, 'ort', onnxruntime.__version__, 'ov', openvino.__version__, 'torch', torch.__version__)" || exit 1
timeout ${GPU_S:-200} python3 dev/device_check.py gpu 2>$OUT/gpu.err | cut -c1-260
C=$(lscpu -p=CPU,CORE | grep -v '#' | awk -F, '!s[$2]++{print $1}' | head -2 | paste -sd,)
echo "CPU part on cpus $C"
CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 EVAL=1 timeout ${CPU_S:-300} taskset -c $C python3 dev/device_check.py cpu 2>$OUT/cpu.err | cut -c1-260
tail -c 3000 $OUT/gpu.err | grep -v "%|" | tail -5
