"Precision modes and compiled execution: results, fallbacks and the learner left untouched (no timing here)"
import warnings, pytest, torch
import fastinfer.engine as engine
from fastai.vision.all import Learner
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *

def agree(a, b): return (a.argmax(1)==b.argmax(1)).float().mean().item()

def test_bf16(single, monkeypatch):
    "the bf16 engine itself (forced as if this CPU had native bf16 and bf16 were faster): near answers, learner untouched"
    learn,files = single
    ref = learn.fast_get_preds(files, backend='torch')[0]
    w = [p.detach().clone() for p in learn.model.parameters()]
    monkeypatch.setattr(engine, 'native_bf16', lambda: True)
    res = learn.fast_get_preds(files, bs=16, precision='bf16', backend='torch')[0]
    eq(res.dtype, torch.float32)
    assert (res-ref).abs().max() < 0.05 and agree(res, ref) >= 0.95
    # the learner's own model is not converted: fastai's path and the exact path are unchanged
    for a,b in zip(w, learn.model.parameters()): eq(a, b.detach())
    assert all(p.is_contiguous() for p in learn.model.parameters())  # not converted to channels_last
    eq(learn.fast_get_preds(files, backend='torch')[0], ref)
    p = learn.fast_predict(files[0], precision='bf16', backend='torch')
    close(p[2], ref[0], eps=0.05)

def test_bad_precision(single):
    learn,files = single
    with pytest.raises(ValueError, match="needs a CUDA device; on cpu use None"): learn.fast_get_preds(files[:2], precision='fp16')
    with pytest.raises(ValueError, match='expected one of'): learn.fast_predict(files[0], precision='half')

def test_compiled_parity(single):
    "a real `torch.compile` (inductor, freezing): same answers as fastai, short last batch padded"
    learn,files = single
    with learn.no_bar(): ref = learn.get_preds(dl=learn.dls.test_dl(files, bs=16), with_decoded=True)
    res = learn.fast_get_preds(files, bs=16, with_decoded=True, compile=True)
    assert len(files)%16, 'the last batch must be short to test padding'
    close(res[0], ref[0], eps=1e-5); eq(res[2], ref[2])
    assert fi_state(learn)['engines'][('compile', None, 'cpu', 16)].warm
    learn.fast_prepare(bs=1, compile=True)
    with learn.no_bar(): p = learn.predict(files[0])
    r = learn.fast_predict(files[0], backend='compile')
    assert fi_state(learn)['engines'][('compile', None, 'cpu', 1)].warm
    close(r[2], p[2], eps=1e-5); eq(r[0], p[0])

def test_compile_failure_falls_back(single, monkeypatch):
    learn,files = single
    learn.fast_reset()
    def broken(m, **kw):
        def f(*a): raise RuntimeError('no compiler here')
        return f
    monkeypatch.setattr(torch, 'compile', broken)
    ref = learn.fast_get_preds(files, backend='torch')[0]
    with pytest.warns(UserWarning, match='torch.compile failed.*no compiler here.*running eager'):
        res = learn.fast_get_preds(files, bs=16, compile=True)[0]
    eq(res, ref)
    learn.fast_reset()

def test_auto_compile_policy(single, monkeypatch):
    "where 'auto' chose eager torch, `compile=None` compiles only when the eager time still ahead outweighs the compile cost"
    learn,files = single
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: m)
    def no_onnx(*a, **kw): raise RuntimeError('no ONNX Runtime here')
    monkeypatch.setattr(engine, 'OnnxBackend', no_onnx)
    warnings.simplefilter('ignore')
    key = ('compile', None, 'cpu', 8)
    learn.fast_reset(); monkeypatch.setattr(engine, 'COMPILE_S', 1e9)
    learn.fast_get_preds(files, bs=8)
    assert key not in fi_state(learn)['engines']
    monkeypatch.setattr(engine, 'COMPILE_S', 0.)
    learn.fast_get_preds(files, bs=8)
    assert fi_state(learn)['engines'][key].warm
    learn.fast_reset()

def test_compile_needs_fixed_size(single):
    learn,files = single
    learn.fast_pipes._fixed = False
    try:
        with pytest.warns(UserWarning, match='compiling ignored'): learn.fast_get_preds(files[:3], compile=True)
    finally: del learn.fast_pipes._fixed
    assert learn.fast_pipes.fixed_size

def test_auto_workers():
    eq(auto_workers(10, 64, torch.device('cpu')), 0)
    assert auto_workers(100_000, 64, torch.device('cpu')) >= 1

def test_fast_decode(single, tmp_path):
    "opt-in JPEG draft decoding: same shapes and near answers on big JPEGs; PNGs and in-memory items are untouched"
    from PIL import Image
    learn,files = single
    jpgs = []
    for i,f in enumerate(files[:6]):
        jpgs.append(tmp_path/f'{i}.jpg'); Image.open(f).resize((960,720)).save(jpgs[-1], quality=92)
    a = learn.fast_get_preds(jpgs, with_input=True)
    b = learn.fast_get_preds(jpgs, with_input=True, fast_decode=True)
    eq(a[0].shape, b[0].shape)
    assert not torch.equal(a[0], b[0]) and (a[1]-b[1]).abs().max() < 0.1
    eq(learn.fast_get_preds(files[:6], fast_decode=True)[0], learn.fast_get_preds(files[:6])[0])
    mem = [Image.open(f).convert('RGB') for f in jpgs]
    eq(learn.fast_get_preds(mem, fast_decode=True)[0], learn.fast_get_preds(mem)[0])

def test_auto_compile_needs_parity(single, monkeypatch):
    "a compiled graph whose answers drift from eager torch (as inductor's did on an H100) is not used by 'auto'"
    learn,files = single
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: (lambda *xb: m(*xb)*1.05))
    def no_onnx(*a, **kw): raise RuntimeError('no ONNX Runtime here')
    monkeypatch.setattr(engine, 'OnnxBackend', no_onnx)
    monkeypatch.setattr(engine, 'COMPILE_S', 0.)
    learn.fast_reset()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        res = learn.fast_get_preds(files, bs=8)[0]
    assert any('torch.compile not used' in str(w.message) for w in ws)
    eq(res, learn.fast_get_preds(files, bs=8, backend='torch')[0])
    learn.fast_reset()
