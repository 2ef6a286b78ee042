"The backend matrix: every learner kind with each backend forced, on each surface that can serve it, against fastai's own answers"
import warnings, pytest, torch
import numpy as np
from fastai.vision.all import Learner
from fastai.torch_core import TensorBase
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.preds import LearnerPredictor
from fastinfer.runtime import native_bf16
from fastinfer.test_utils import unet_synth
from conftest import as_saved

EPS = 1e-5
BF16_EPS = 2e-2  # bf16 keeps 8 bits of mantissa: the synthetic learners moved up to 5.1e-3 (segmentation), trained digits 2.1e-2
FORCED = ['torch', 'onnxruntime'] + (['openvino'] if has_openvino() else [])

def fastai_preds(learn, files):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(files, bs=16), with_input=True, with_decoded=True)

def agree(a, b, exact):
    "Discrete outputs identical; float ones (regression, points) within `EPS` of the output's scale unless `exact`"
    eq(type(a), type(b))
    floats = b.is_floating_point() if torch.is_tensor(b) else isinstance(b, (tuple, list)) and all(isinstance(o, float) for o in b)
    if exact or not floats: eq(a, b)
    else: assert max_dp(torch.as_tensor(a), torch.as_tensor(b)) <= EPS

@pytest.mark.parametrize('backend', FORCED)
def test_get_preds(kind_learner, backend):
    "`fast_get_preds` with `backend` forced: fastai's types, inputs, decoded outputs, and probabilities (bit-identical on torch)"
    kind,learn,files = kind_learner
    ref = fastai_preds(learn, files)
    res = as_saved(kind, learn).fast_get_preds(files, bs=16, with_input=True, with_decoded=True, fully_decoded=True, backend=backend)
    assert not learn.model.training
    eq([type(o) for o in res[:4]], [type(o) for o in ref])
    eq(res[0], ref[0])
    if backend=='torch': eq(res[1], ref[1])
    else: assert max_dp(res[1], ref[1]) <= EPS, (kind, max_dp(res[1], ref[1]))
    agree(res[3], ref[3], backend=='torch')
    for a,(_,b) in zip(res[4], learn.dls.decode_batch((ref[0], ref[3]), max_n=None)): agree(a, b, backend=='torch')

@pytest.mark.parametrize('backend', FORCED)
def test_predict(kind_learner, backend):
    kind,learn,files = kind_learner
    for f in files[:2]:
        with learn.no_bar(): ref = learn.predict(f)
        res = as_saved(kind, learn).fast_predict(f, backend=backend)
        eq([type(o) for o in res], [type(o) for o in ref])
        assert max_dp(res[2], ref[2]) <= EPS
        if kind in ('regression', 'points'): close(torch.as_tensor(res[0]), torch.as_tensor(ref[0]), eps=1e-4)
        else: eq(res[0], ref[0]); eq(res[1], ref[1])

@pytest.mark.parametrize('backend', ['auto'] + FORCED)
def test_learner_predictor(kind_learner, backend):
    "what `fastinfer serve` and `predict` run for a `.pkl`: batches of 1 and of 4 give fastai's rows, whatever the model's saved mode"
    kind,learn,files = kind_learner
    ref = fastai_preds(learn, files[:4])[1].numpy()
    p = LearnerPredictor(as_saved(kind, learn), backend)
    got = np.concatenate([p.run([p.prep(files[0])]), p.run([p.prep(f) for f in files[:4]])])
    assert np.abs(got - np.concatenate([ref[:1], ref])).max() <= EPS*max(1, np.abs(ref).max())

@pytest.mark.parametrize('kind', ['single', 'regression'])
def test_compile(root, kind):
    from conftest import learner
    learn,files = learner(kind, root)
    ref = fastai_preds(learn, files)
    res = as_saved(kind, learn).fast_get_preds(files, bs=16, with_decoded=True, backend='compile')
    eq(type(res[0]), type(ref[1]))
    assert max_dp(res[0], ref[1]) <= EPS
    eq(res[2], ref[3]) if kind=='single' else close(res[2], ref[3], eps=EPS)

def test_unet_types(tmp_path):
    "a `unet_learner` returns fastai's `TensorBase` on every backend; compiling it is refused at once, with the reason"
    learn,files = unet_synth(tmp_path/'u')
    ref = fastai_preds(learn, files)
    for b in FORCED:
        res = learn.fast_get_preds(files, with_decoded=True, backend=b)
        eq(type(res[0]), TensorBase); eq(type(res[0]), type(ref[1])); eq(type(res[2]), type(ref[3]))
        assert max_dp(res[0], ref[1]) <= EPS
    with pytest.warns(UserWarning, match='not compiling DynamicUnet: .*ToTensorBase'): res = learn.fast_get_preds(files[:2], backend='compile')[0]
    eq(res, learn.fast_get_preds(files[:2], backend='torch')[0])

def test_training_mode_everywhere(root, tmp_path):
    "a model left in training mode: `fast_prepare`, `quantize`'s calibration and the exports all run it in eval mode"
    from conftest import learner
    learn,files = learner('train', root)
    ref = fastai_preds(learn, files)[1]
    learn.model.train(); learn.fast_reset().fast_prepare(bs=(1, 4))
    assert not learn.model.training
    learn.model.train()
    ql = learn.quantize(files[:16], n_batches=1, bs=16)
    assert max_dp(ql.fast_get_preds(files)[0], ref) <= 0.05
    for f in (learn.export_onnx, learn.export_jit):
        learn.model.train()
        p = load(f(tmp_path/f'm.{"onnx" if f==learn.export_onnx else "pt"}', example_items=files[:4]))
        assert np.abs(p.get_preds(files)[0] - ref.numpy()).max() <= 1e-4

# torch's autocast rounds as native bf16 does, emulated or not; OpenVINO is asked for bf16 only where the CPU has it
BF16 = ['torch'] + (['openvino'] if has_openvino() and native_bf16() else [])

@pytest.mark.parametrize('backend', BF16)
def test_bf16(kind_learner, backend, monkeypatch):
    "`precision='bf16'` forced on each engine that runs it, as on a CPU with native bf16 (mocked where it is missing): fastai's types and inputs, fp32 outputs within bf16's rounding"
    import fastinfer.engine as engine
    monkeypatch.setattr(engine, 'native_bf16', lambda: True)
    kind,learn,files = kind_learner
    ref = fastai_preds(learn, files)
    try:
        res = as_saved(kind, learn).fast_get_preds(files, bs=16, with_input=True, with_decoded=True, precision='bf16', backend=backend)
        eq([type(o) for o in res], [type(o) for o in ref])
        eq(res[0], ref[0])
        eq(res[1].dtype, ref[1].dtype)  # back in fp32, as fastai's
        assert max_dp(res[1], ref[1]) <= BF16_EPS, (kind, max_dp(res[1], ref[1]))
        with learn.no_bar(): r = learn.predict(files[0])
        p = as_saved(kind, learn).fast_predict(files[0], precision='bf16', backend=backend)
        eq([type(o) for o in p], [type(o) for o in r])
        eq(p[2].dtype, r[2].dtype)
        assert max_dp(p[2], r[2]) <= BF16_EPS
    finally: learn.fast_reset()  # no bf16 engine left for tests that check the fallback
