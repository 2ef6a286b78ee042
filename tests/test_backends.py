"backend='auto': the measured choice, its fallbacks (export fails, parity probe fails), bf16 by CPU capability; no timing asserted"
import subprocess, sys, warnings, pytest, torch
import fastinfer.engine as engine
from fastai.vision.all import Learner
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastcore.basics import noop
from fastinfer.test_utils import NoExport

def test_auto_choice_reported(single):
    learn,files = single
    learn.fast_reset()
    ref = learn.fast_get_preds(files, backend='torch')[0]
    res = learn.fast_get_preds(files, bs=16)[0]
    close(res, ref, eps=1e-5)
    c = learn.fast_backend()[(None, 'cpu', 16)]
    cands = {'torch', 'onnxruntime'} | ({'openvino'} if has_openvino() else set())
    assert c['backend'] in cands and set(c['ms_per_item'])==cands
    assert all(c['max_dp'][k] <= engine.PARITY/engine.PROBE_MARGIN for k in cands) and c['dropped']=={}
    eq(c['backend'], min(c['ms_per_item'], key=c['ms_per_item'].get))  # the faster one
    close(learn.fast_get_preds(files, backend='onnxruntime')[0], ref, eps=1e-5)
    with pytest.raises(ValueError, match="backend='tensorrt': expected one of"): learn.fast_get_preds(files, backend='tensorrt')

def test_probe_timing_rows():
    "a timed candidate warms up on two rows, is timed on the rest, and every row it ran is checked; one run of all rows when `reps` is 1"
    calls = []
    def e(xb): calls.append(len(xb[0])); return xb[0]*2
    x = (torch.arange(6.)[:,None],)
    for reps,sizes in ((1, [6]), (2, [2, 4]), (3, [2, 4, 4])):
        calls.clear()
        ms,out = engine._time(e, x, noop, reps)
        eq(calls, sizes); eq(out, x[0]*2); assert ms > 0
    calls.clear()
    ms,out = engine._time(e, (x[0][:2],), noop, 2)  # too few rows to split: a warm-up run of them all, then the timed one
    eq(calls, [2, 2]); eq(out, x[0][:2]*2)

def test_export_failure_falls_back(single):
    "a model with an op that does not export to ONNX: 'auto' drops ONNX Runtime with one warning, answers unchanged"
    learn,files = single
    bad = Learner(learn.dls, NoExport(learn.model), loss_func=learn.loss_func)
    with pytest.warns(UserWarning, match="backend 'onnxruntime' dropped for NoExport.*no ONNX translation"): res = bad.fast_get_preds(files)[0]
    eq(res, learn.fast_get_preds(files, backend='torch')[0])
    c = bad.fast_backend()[(None, 'cpu', 64)]
    eq(c['backend'], 'torch'); assert 'no ONNX translation' in c['dropped']['onnxruntime']
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        bad.fast_predict(files[0])  # warned once per learner
    with pytest.raises(RuntimeError, match='no ONNX translation'): bad.fast_get_preds(files, backend='onnxruntime')

def test_parity_probe_drops_perturbed_backend(single, monkeypatch):
    learn,files = single
    learn.fast_reset()
    call = engine.OnnxBackend.__call__
    monkeypatch.setattr(engine.OnnxBackend, '__call__', lambda self, xb: call(self, xb)*1.05)  # softmax ignores a shift
    with pytest.warns(UserWarning, match="backend 'onnxruntime' dropped: max .Δp. .* > 1e-06"): res = learn.fast_get_preds(files, bs=16)[0]
    eq(res, learn.fast_get_preds(files, bs=16, backend='torch')[0])
    eq(learn.fast_backend()[(None, 'cpu', 16)]['backend'], 'torch')
    learn.fast_reset()

def test_bf16_without_native_support(single, monkeypatch):
    "no avx512_bf16/amx_bf16: precision='bf16' warns once, naming the missing feature, and runs fp32 (the default's answers)"
    learn,files = single
    learn.fast_reset()
    monkeypatch.setattr(engine, 'native_bf16', lambda: False)
    with pytest.warns(UserWarning, match="precision='bf16' falls back to fp32: .*avx512_bf16, amx_bf16"): res = learn.fast_get_preds(files, precision='bf16')[0]
    close(res, learn.fast_get_preds(files, backend='torch')[0], eps=1e-5)
    assert not any(k[1]=='bf16' for k in fi_state(learn)['engines'])  # no bf16 engine was even built
    learn.fast_reset()

def test_bf16_with_native_support(single, monkeypatch):
    "native bf16: the bf16 candidate is measured against the fp32 ones, and kept only if faster"
    learn,files = single
    learn.fast_reset()
    monkeypatch.setattr(engine, 'native_bf16', lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = learn.fast_get_preds(files, bs=16, precision='bf16')[0]
    c = learn.fast_backend()[('bf16', 'cpu', 16)]
    assert 'torch bf16' in c['ms_per_item']
    fastest = min(c['ms_per_item'], key=c['ms_per_item'].get)
    eq((c['backend'], c['precision']), (fastest.split()[0], 'bf16' if fastest.endswith('bf16') else None))
    close(res, learn.fast_get_preds(files, backend='torch')[0], eps=0.05)
    learn.fast_reset()

@pytest.mark.parametrize('faster', ['bf16', 'fp32'])
def test_bf16_choice_timings_mocked(single, monkeypatch, faster):
    "native bf16 (mocked), every candidate timed by a mock: bf16 is kept only when it measures faster, else fp32 with the reason"
    learn,files = single
    learn.fast_reset()
    ref = learn.fast_get_preds(files, bs=16, backend='torch')[0]
    monkeypatch.setattr(engine, 'native_bf16', lambda: True)
    bf = 0.5 if faster=='bf16' else 2.
    fake = {('torch', None): 10., ('onnxruntime', None): 8., ('openvino', None): 7., ('torch', 'bf16'): 10*bf, ('openvino', 'bf16'): 7*bf}
    monkeypatch.setattr(engine, '_time', lambda e, x, act, reps: (fake[(e.name, e.precision)], act(e(x))))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = learn.fast_get_preds(files, bs=16, precision='bf16')[0]
    c = learn.fast_backend()[('bf16', 'cpu', 16)]
    ms = c['ms_per_item']
    assert 'torch bf16' in ms and ('openvino bf16' in ms or not has_openvino() or 'openvino bf16' in c['dropped'])
    best = min(ms, key=ms.get) if faster=='bf16' else min((k for k in ms if 'bf16' not in k), key=ms.get)
    eq((c['backend'], c['precision']), (best.split()[0], 'bf16' if faster=='bf16' else None))
    fell_back = [str(o.message) for o in w if 'falls back to fp32' in str(o.message)]
    if faster=='bf16': assert not fell_back; close(res, ref, eps=0.05)
    else: assert fell_back and 'measured slower' in fell_back[0]; close(res, ref, eps=1e-5)
    learn.fast_reset()

def test_pick_backend():
    eq(pick_backend({'torch': 3., 'onnxruntime': 2.}), ('onnxruntime', 'onnxruntime', None))
    eq(pick_backend({'torch': 3., 'openvino': 2., 'torch bf16': 2.5, 'openvino bf16': 1.}), ('openvino bf16', 'openvino', 'openvino bf16'))
    eq(pick_backend({'torch': 3., 'openvino': 2., 'openvino bf16': 2.}), ('openvino', 'openvino', 'openvino bf16'))

def test_quantized_learner_runs_its_int8_model(single, monkeypatch):
    "an int8 learner runs its own ONNX Runtime session (what fastai runs), unless OpenVINO on the same graph is forced, or measured faster and as close"
    learn,files = single
    ql = learn.quantize(files[:16], n_batches=1, bs=16)
    assert isinstance(ql.model, OrtModule)
    eq(ql.fast_select(None).name, 'torch')  # the OrtModule runs ONNX Runtime itself
    own = ql.fast_get_preds(files, bs=16, backend='torch')[0]
    with ql.no_bar(): close(ql.get_preds(dl=ql.dls.test_dl(files, bs=16))[0], own, eps=1e-6)
    if not has_openvino(): return
    ov = ql.fast_get_preds(files, bs=16, backend='openvino')[0]
    assert max_dp(ov, own) <= 0.05 and (ov.argmax(1)==own.argmax(1)).float().mean() >= 0.9
    close(ql.fast_get_preds(files, bs=16)[0], own, eps=1e-5)  # 'auto': fastai's int8 answers
    c = ql.fast_backend()[('int8', 'cpu', 16)]
    if 'openvino' in c['dropped']: assert 'against ONNX Runtime int8' in c['dropped']['openvino'] and c['backend']=='onnxruntime'
    # as close (mocked), the faster one is kept, both ways
    monkeypatch.setattr(engine, 'max_dp', lambda a, b: 0.)
    for faster in ('openvino', 'onnxruntime'):
        ql.fast_reset()
        monkeypatch.setattr(engine, '_time', lambda e, x, act, reps: (1. if (e.name=='openvino')==(faster=='openvino') else 2., act(e(x))))
        res = ql.fast_get_preds(files, bs=16)[0]
        eq(ql.fast_backend()[('int8', 'cpu', 16)]['backend'], faster)
        close(res, ov if faster=='openvino' else own, eps=1e-6)

def test_one_torch_thread_while_ort_runs(single, monkeypatch):
    "torch runs on one thread around ONNX Runtime batches, all its threads around torch ones, and gets its count back, also after concurrent calls"
    from concurrent.futures import ThreadPoolExecutor
    learn,files = single
    n,seen = torch.get_num_threads(),{}
    for cls in (engine.OnnxBackend, engine.TorchBackend):
        def spy(self, xb, f=cls.__call__): seen.setdefault(self.name, set()).add(torch.get_num_threads()); return f(self, xb)
        monkeypatch.setattr(cls, '__call__', spy)
    ref = learn.fast_get_preds(files, bs=8, backend='torch')[0]
    eq(learn.fast_get_preds(files, bs=8, backend='onnxruntime')[0].shape, ref.shape)
    eq(seen, {'torch': {n}, 'onnxruntime': {1}})
    eq(torch.get_num_threads(), n)
    with ThreadPoolExecutor(4) as ex: res = list(ex.map(lambda f: learn.fast_predict(f, backend='onnxruntime')[2], files[:12]))
    close(torch.stack(res), ref[:12], eps=1e-5)
    eq(torch.get_num_threads(), n)
    learn.fast_reset()  # an ONNX Runtime session built while torch is held at one thread still gets the user's count
    with engine.ort_threads(): eq(learn.fast_engine('onnxruntime', xb=(ref.new_zeros(2, 3, 40, 40),)).model.ort.threads, n)

def test_ort_spins_within_runs_only(single):
    "ONNX Runtime sessions (the learner's and the runtime's, built by the one `OrtModel`) spin within a run and stop after it"
    from fastinfer.runtime import OrtModel, ORT_SPIN
    learn,_ = single
    m = learn.fast_engine('onnxruntime', xb=(torch.zeros(2, 3, 40, 40),)).model.ort
    assert isinstance(m, OrtModel)
    opts = m.sess.get_session_options()
    eq(opts.get_session_config_entry('session.force_spinning_stop'), '1')  # threads left spinning slow what runs next
    eq(opts.get_session_config_entry('session.intra_op.allow_spinning'), '1' if ORT_SPIN else '0')

def test_prefetch_order_errors_and_early_stop():
    from fastinfer.preds import prefetch
    eq(list(prefetch(iter(range(50)))), list(range(50)))
    def bad():
        yield 1; raise KeyError('boom')
    it = prefetch(bad())
    eq(next(it), 1)
    with pytest.raises(KeyError, match='boom'): next(it)
    seen = []
    def slow():
        for i in range(1000): seen.append(i); yield i
    for i in prefetch(slow()):
        if i==3: break
    import time; time.sleep(0.3)
    assert len(seen) < 10  # the thread stopped with its consumer

def test_ort_hint_needs_a_current_choice(single):
    "torch is held at one thread from a call's start only where a choice of ONNX Runtime stands for the current weights"
    learn,files = single
    learn.fast_reset()
    fi_state(learn).setdefault('choice', {})[(None, 'cpu', 4)] = dict(backend='onnxruntime', version=engine._weights_version(learn.model))
    assert learn._fast_ort('auto', None, 'cpu', 4) and not learn._fast_ort('torch', None, 'cpu', 4)
    with torch.no_grad(): next(learn.model.parameters()).add_(0)  # changed in place: the choice is measured again
    assert not learn._fast_ort('auto', None, 'cpu', 4)
    learn.fast_reset()

def test_first_batch_decoded_in_threads(single, monkeypatch):
    "the first batch is decoded on every core, in order: same rows, and a bad item is named as a serial decode names it"
    import threading
    from fastai.vision.all import defaults
    from fastinfer.preds import ItemsDataset
    learn,files = single
    names,get = set(),ItemsDataset.__getitem__
    def spy(self, i): names.add(threading.current_thread().name); return get(self, i)
    monkeypatch.setattr(ItemsDataset, '__getitem__', spy)
    monkeypatch.setattr(defaults, 'cpus', 2)
    items = files[:5] + ['missing0.png'] + files[5:9] + ['missing1.png']
    probs,_,errors = learn.fast_get_preds(items, on_error='skip')
    assert any(n.startswith('fastinfer-decode') for n in names)
    eq([e[0] for e in errors], [5, 10])
    close(probs[[0,1,2,3,4,6,7,8,9]], learn.fast_get_preds(files[:9], bs=1, backend='torch')[0], eps=1e-5)
    with pytest.raises(ValueError, match='item 5.*missing0.png'): learn.fast_get_preds(items)

IMPORT = """
import warnings; warnings.filterwarnings('ignore')
import fastinfer
from fastai.vision.all import *
from fastinfer.test_utils import synth_learner
learn,files = synth_learner('single', sys.argv[1], n=8)
print(learn.fast_get_preds(files[:2])[0].shape[0])
"""

def test_import_fastinfer_patches_learner(tmp_path):
    r = subprocess.run([sys.executable, '-c', 'import sys\n' + IMPORT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-2000:]
    eq(r.stdout.split()[-1], '2')
