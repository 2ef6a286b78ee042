"""Device checks (a lent GPU machine; `dev/device_run.sh` runs them): `gpu` (parity of every learner kind on CUDA, then the
resnet18 bench there), `cpu` (bf16 against fp32 on the host's CPU) and `first` (first calls of fresh processes), the last two
pinned to 2 cores by the caller. Writes JSON lines to $OUT/<part>.jsonl; `SMOKE=1` checks the script on a CPU-only machine"""
import os, sys, json, time, tempfile, traceback, warnings
warnings.simplefilter('ignore')
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import *
import fastinfer.all
from fastinfer.test_utils import KINDS, TAB_KINDS, synth_learner, tab_learner
from fastinfer.bench import bench_corpus, bench_learner, _measure, _predict_rows, cpu_line, ceiling
from fastinfer.runtime import native_bf16, cpu_count

OUT = Path(os.environ.get('OUT', '/tmp/out')); OUT.mkdir(parents=True, exist_ok=True)
part = sys.argv[1]
SMOKE = bool(os.environ.get('SMOKE'))  # a quick run on a CPU-only machine, to check the script itself
_cores = []  # OpenVINO Cores made to time their start, kept until exit (see `blob`)
CPU = not torch.cuda.is_available()
log = open(OUT/f'{part}.jsonl', 'a')
def emit(**kw):
    kw = {k: (round(v, 9) if isinstance(v, float) else v) for k,v in kw.items()}
    print(json.dumps(kw), flush=True); log.write(json.dumps(kw)+'\n'); log.flush()

def flat(o):
    "The tensors of `o` (a tensor, or tuples/lists of them) as one flat float vector"
    if o is None: return torch.zeros(0)
    if torch.is_tensor(o): return o.detach().float().cpu().flatten()
    if isinstance(o, (tuple, list)): return torch.cat([flat(x) for x in o]) if len(o) else torch.zeros(0)
    return torch.as_tensor(o).float().flatten()
def mdp(a, b): a,b = flat(a),flat(b); return (a-b).abs().max().item() if a.numel() and a.shape==b.shape else float('nan')
def same(a, b): a,b = flat(a),flat(b); return bool(a.shape==b.shape and torch.equal(a, b))

def try_(name, f):
    t0 = time.perf_counter()
    try: f()
    except Exception as e: emit(check=name, error=f'{type(e).__name__}: {e}'[:600], tb=traceback.format_exc()[-1500:])
    emit(check=name, done_s=time.perf_counter()-t0)

def on_dev(l):
    "`l` on the GPU (fastai's `load_learner(cpu=False)` leaves it on the CPU unless `defaults.use_cuda` is set)"
    if not CPU: l.dls.to(torch.device('cuda')); l.model.to('cuda')
    return l

def gpu_parity():
    root = Path(tempfile.mkdtemp())
    modes = {'default': {}, 'torch': dict(backend='torch'), 'fp16': dict(precision='fp16'), 'bf16': dict(precision='bf16')}
    if CPU: del modes['fp16']
    for kind in (KINDS[:2] if SMOKE else KINDS):
        def one():
            learn,files = synth_learner(kind, root/kind, n=44, epochs=1)
            learn.export(root/f'{kind}.pkl')
            l = on_dev(load_learner(root/f'{kind}.pkl', cpu=CPU))
            if kind=='train': l.model.train()
            with l.no_bar(): ref = l.get_preds(dl=l.dls.test_dl(files, bs=16), with_decoded=True)
            for m,kw in modes.items():
                res = l.fast_get_preds(files, bs=16, with_decoded=True, **kw)
                fl = ref[0].is_floating_point()
                emit(check='gpu_parity', kind=kind, mode=m, device=str(l.dls.device), max_dp=mdp(res[0], ref[0]),
                     decoded_same=same(res[2], ref[2]), decoded_max_d=mdp(res[2], ref[2]),
                     top1=(res[0].argmax(-1)==ref[0].argmax(-1)).float().mean().item() if ref[0].ndim>1 else None)
            with l.no_bar(): p_ref = l.predict(files[0])
            p = l.fast_predict(files[0])
            emit(check='gpu_predict', kind=kind, max_dp=mdp(p[2], p_ref[2]), decoded_same=str(p[0])==str(p_ref[0]))
        try_(f'vision {kind}', one)
    for kind in (TAB_KINDS[:1] if SMOKE else TAB_KINDS):
        def one():
            learn,df = tab_learner(kind, root/f'tab_{kind}')
            learn.export(root/f'tab_{kind}.pkl')
            l = on_dev(load_learner(root/f'tab_{kind}.pkl', cpu=CPU))
            with l.no_bar(): ref = l.get_preds(dl=l.dls.test_dl(df), with_decoded=True)
            for m,kw in {'default': {}, 'torch': dict(backend='torch'), **({} if CPU else {'fp16': dict(precision='fp16')})}.items():
                res = l.fast_get_preds(df, with_decoded=True, **kw)
                emit(check='gpu_tab_parity', kind=kind, mode=m, max_dp=mdp(res[0], ref[0]), decoded_same=same(res[2], ref[2]))
            row = df.drop(columns=[c for c in df if c.startswith('y')]).iloc[0]  # fastai's `predict` fails on a row holding object-typed targets
            with l.no_bar(): p_ref = l.predict(row)
            p = l.fast_predict(row)
            emit(check='gpu_tab_predict', kind=kind, max_dp=mdp(p[2], p_ref[2]))
        try_(f'tabular {kind}', one)

def gpu_bench():
    files,_ = bench_corpus(n=512, n_big=0)
    bench_learner().export('/tmp/b.pkl')
    learn = on_dev(load_learner('/tmp/b.pkl', cpu=CPU))
    emit(check='gpu_bench_env', device=str(learn.dls.device), gpu=torch.cuda.get_device_name(), torch=torch.__version__, cpus=cpu_count())
    def fa(items):
        with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(items, bs=64))[0]
    def fi(**kw): return lambda items: learn.fast_get_preds(items, bs=64, **kw)[0]
    def synced(f):
        def g(items): r = f(items); torch.cuda.synchronize(); return r
        return g
    fs = {'fastai get_preds': fa, 'fastinfer default': fi(), "backend='torch'": fi(backend='torch'),
          "precision='fp16'": fi(precision='fp16'), "precision='bf16'": fi(precision='bf16')}
    for r in _measure({k: synced(f) for k,f in fs.items()}, files, 2): emit(check='gpu_bench', **r)
    emit(check='gpu_choice', choice=str(learn.fast_backend())[:800])
    for r in _predict_rows(learn, files[:32]): emit(check='gpu_predict_lat', **r)

def cpu_bf16():
    emit(check='cpu', line=cpu_line(), native_bf16=native_bf16(), cpus=cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__)
    files,_ = bench_corpus(n=16 if SMOKE else 256, n_big=0)
    learn = bench_learner()
    def fa(items):
        with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(items, bs=64))[0]
    def fi(**kw): return lambda items: learn.fast_get_preds(items, bs=64, **kw)[0]
    fs = {'fastai get_preds': fa, 'fastinfer default': fi(), "precision='bf16' (auto)": fi(precision='bf16'),
          "backend='onnxruntime'": fi(backend='onnxruntime'), "backend='openvino'": fi(backend='openvino'),
          "backend='openvino' bf16": fi(backend='openvino', precision='bf16'), "backend='torch' bf16": fi(backend='torch', precision='bf16')}
    for r in _measure(fs, files, 2): emit(check='cpu_bench', **r)
    emit(check='cpu_choice', choice=str(learn.fast_backend())[:1500])
    for r in _predict_rows(learn, files[:32]): emit(check='cpu_predict_lat', **r)
    try_('ceiling', lambda: emit(check='cpu_ceiling', s_per_img=ceiling(learn, files, 64)))
    def blob():
        import io, openvino as ov
        from fastinfer.engine import onnx_bytes
        b = learn.export_onnx(Path(tempfile.mkdtemp())/'m.onnx', example_items=files[:2]).read_bytes()
        # each Core is kept until exit: OpenVINO's CPU plugin restores the thread's alternate signal stack when its Core goes, and
        # Cores freed in the order they were made leave it on freed memory, where the next signal kills the process (`runtime.ov_core`)
        def fresh(): _cores.append(ov.Core()); return _cores[-1]
        core = fresh(); net = core.read_model(io.BytesIO(b))
        for prec in ('f32', 'bf16'):
            cfg = {'INFERENCE_PRECISION_HINT': prec, 'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_NUM_THREADS': cpu_count()}
            tc,ti = [],[]
            for _ in range(3):
                t0 = time.perf_counter(); c = fresh().compile_model(core.read_model(io.BytesIO(b)), 'CPU', cfg); tc.append(time.perf_counter()-t0)
                buf = io.BytesIO(); c.export_model(buf); v = buf.getvalue()
                t0 = time.perf_counter(); fresh().import_model(io.BytesIO(v), 'CPU', cfg); ti.append(time.perf_counter()-t0)
            emit(check='ov_blob', precision=prec, compile_s=tc, import_s=ti)
    try_('ov_blob', blob)
    def acc():
        from fastinfer.evaluate import evaluate
        for r in evaluate(): emit(check='evaluate', **{k:v for k,v in r.items() if isinstance(v, (int, float, str, type(None)))})
    if os.environ.get('EVAL'): try_('evaluate', acc)

def first_call(reps:int=3):
    "The first call of a fresh process (128 images, default precision), empty and warm cache, `reps` times; then `fast_predict` latency again"
    from fastinfer.bench import bench_first_call
    files,_ = bench_corpus(n=128, n_big=0)
    learn = bench_learner()
    learn.export('/tmp/first.pkl')
    for i in range(reps):
        for r in bench_first_call('/tmp/first.pkl', files[0].parent.parent, n=128): emit(check='first_call', rep=i, **r)
    for r in _predict_rows(learn, files[:32]): emit(check='cpu_predict_lat2', **r)

{'gpu': lambda: (try_('gpu_parity', gpu_parity), try_('gpu_bench', gpu_bench)), 'cpu': lambda: try_('cpu_bf16', cpu_bf16), 'first': lambda: try_('first_call', first_call)}[part]()
