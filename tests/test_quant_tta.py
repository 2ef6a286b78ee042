"quantize (ONNX Runtime static int8) and fast_tta (fastai's tta formula, seeded)"
import pytest, torch
from torch import nn
from fastai.vision.all import Learner
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.quant import _has_int8
from fastinfer.engine import OrtModule

@pytest.fixture(scope='module')
def qsingle(single): return single[0].quantize(single[1][:32], n_batches=2, bs=16)

def test_quantize_new_learner(single, qsingle):
    learn,files = single
    w = [p.detach().clone() for p in learn.model.parameters()]
    ql = qsingle
    assert ql is not learn and isinstance(ql.model, OrtModule) and _has_int8(ql.model.onnx) and not isinstance(learn.model, OrtModule)
    for a,b in zip(w, learn.model.parameters()): eq(a, b.detach())
    p32,p8 = learn.fast_get_preds(files)[0],ql.fast_get_preds(files)[0]
    assert (p32-p8).abs().max() < 0.2 and (p32.argmax(1)==p8.argmax(1)).float().mean() >= 0.9
    eq(ql.fast_predict(files[0])[1], p8[0].argmax())
    # fastai's own get_preds runs the same int8 model
    with ql.no_bar(): close(ql.get_preds(dl=ql.dls.test_dl(files, bs=16))[0], p8, eps=1e-5)

def test_quantized_export(qsingle, single, tmp_path):
    ql,(_,files) = qsingle,single
    p = load(ql.export_onnx(tmp_path/'q.onnx', example_items=files[:4]))
    eq(p.spec['precision'], 'int8')
    close(torch.from_numpy(p.get_preds(files)[0]), ql.fast_get_preds(files)[0], eps=1e-2)
    eq(p.get_preds(files)[1], ql.fast_get_preds(files, with_decoded=True)[2].numpy())
    with pytest.raises(ValueError, match='export it with export_onnx'): ql.export_jit(tmp_path/'q.pt')

def test_quantized_learner_pkl(single, tmp_path):
    "fastai's `export` saves a quantized learner (it raised IndexError: an optimizer over no parameters), and it loads with the same int8 graph and answers"
    # it ran in a fresh process for a while: full test runs that did this here segfaulted a few tests later. The cause was OpenVINO's
    # alternate signal stack, left on freed memory by Cores freed in the order they were made (`runtime.ov_core`)
    learn,files = single
    files = files[:16]
    ql = learn.quantize(files, n_batches=2, bs=8)
    ql.export(tmp_path/'q.pkl')
    l2 = reload_learner(tmp_path/'q.pkl')
    assert isinstance(l2.model, OrtModule)
    eq(l2.model.onnx, ql.model.onnx)
    p,r = (l.fast_get_preds(files, bs=8, with_decoded=True) for l in (ql, l2))
    eq(r[0], p[0]); eq(r[2], p[2])
    eq(l2.fast_predict(files[0])[0], ql.fast_predict(files[0])[0])

def test_quantize_refuses(single):
    from fastinfer.test_utils import NoExport
    learn,files = single
    bad = Learner(learn.dls, NoExport(learn.model), loss_func=learn.loss_func)
    with pytest.raises(ValueError, match='cannot quantize NoExport: it does not export to ONNX'): bad.quantize(files[:8])
    flat = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match='no layer of it has an int8 kernel'): Learner(learn.dls, flat, loss_func=learn.loss_func).quantize(files[:8])

def test_tta(single):
    learn,files = single
    eq(learn.fast_tta(files, beta=1.)[0], learn.fast_get_preds(files)[0])
    a,b = learn.fast_tta(files, seed=3, beta=0.)[0],learn.fast_tta(files, seed=3, beta=0.)[0]
    eq(a, b); assert not torch.equal(a, learn.fast_tta(files, seed=4, beta=0.)[0])
    aug,plain = learn.fast_tta(files, beta=None, seed=5)
    close(learn.fast_tta(files, seed=5)[0], torch.lerp(aug, plain, 0.25))
    mx = learn.fast_tta(files, seed=5, use_max=True)[0]
    assert (mx >= plain).all() and (mx >= aug - 1e-7).all() and (mx > plain).any()  # max over plain and each pass >= their mean
    res = learn.fast_tta(files, n=2, with_decoded=True, fully_decoded=True)
    eq(res[2], res[0].argmax(1)); eq(res[3], [learn.dls.vocab[i] for i in res[2]])

def test_tta_matches_fastai_formula(root):
    "on a learner whose training-mode transforms are deterministic, fastai's own `tta` and `fast_tta` agree"
    from conftest import learner
    learn,files = learner('bw', root)
    with learn.no_bar(): ref = learn.tta(dl=learn.dls.test_dl(files, bs=16), n=2)[0]
    close(learn.fast_tta(files, n=2, bs=16)[0], ref, eps=1e-5)
    with learn.no_bar(): ref = learn.tta(dl=learn.dls.test_dl(files, bs=16), n=2, use_max=True)[0]
    close(learn.fast_tta(files, n=2, bs=16, use_max=True)[0], ref, eps=1e-5)
