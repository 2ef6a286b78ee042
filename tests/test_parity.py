"fast_get_preds / fast_predict against fastai's own get_preds / predict on the same loaded learner"
import warnings, pytest
import numpy as np, pandas as pd, torch
from pathlib import Path
from fastai.vision.all import Learner, load_learner, noop, tensor
from fastcore.test import test_eq as eq, test_close as close, test_fail as fails, test_is as same
from fastinfer.all import *
from fastinfer.test_utils import KINDS, odd_items

EPS = 1e-5

def ref_preds(learn, items, bs=16, **kw):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(items, bs=bs), **kw)

def max_dp(a, b): return (a.float()-b.float()).abs().max().item()

def agree(a, b, exact):
    "Discrete outputs (classes, labels, masks) identical; float ones (regression, points) within `EPS` unless `exact`"
    floats = b.is_floating_point() if torch.is_tensor(b) else isinstance(b, (tuple, list)) and all(isinstance(o, float) for o in b)
    if exact or not floats: eq(a, b)
    else: close(torch.as_tensor(a), torch.as_tensor(b), eps=EPS)

@pytest.mark.parametrize('backend', ['auto', 'torch'])
def test_get_preds_parity(kind_learner, backend):
    "the default backend within 1e-5 of fastai, decoded outputs identical; `backend='torch'` bit-identical"
    kind,learn,files = kind_learner
    exact = backend=='torch'
    ref = ref_preds(learn, files, with_input=True, with_decoded=True)
    res = learn.fast_get_preds(files, bs=16, with_input=True, with_decoded=True, fully_decoded=True, backend=backend)
    eq(len(res), 5)
    eq([type(o) for o in res[:4]], [type(o) for o in ref])
    eq(res[0], ref[0])
    if exact: eq(res[1], ref[1])
    else: assert max_dp(res[1], ref[1]) <= EPS, (kind, max_dp(res[1], ref[1]))
    assert res[2] is None
    agree(res[3], ref[3], exact)
    full = [d[1] for d in learn.dls.decode_batch((ref[0], ref[3]), max_n=None)]
    eq(len(res[4]), len(files))
    for a,b in zip(res[4], full): eq(type(a), type(b)); agree(a, b, exact)

@pytest.mark.parametrize('kw', [{}, dict(with_decoded=True), dict(with_input=True), dict(act=noop)])
def test_tuple_shape(single, kw):
    learn,files = single
    ref,res = ref_preds(learn, files[:20], **kw),learn.fast_get_preds(files[:20], bs=16, **kw)
    eq(len(res), len(ref))
    for a,b in zip(res, ref):
        if b is None: assert a is None
        else: close(a, b, eps=EPS); eq(type(a), type(b))

def test_predict_parity(kind_learner):
    kind,learn,files = kind_learner
    for f in files[:3]:
        with learn.no_bar(): ref = learn.predict(f)
        res = learn.fast_predict(f)
        close(res[2], ref[2], eps=EPS)
        eq(type(res[0]), type(ref[0]))
        if kind in ('regression', 'points'): close(tensor(res[0]), tensor(ref[0]), eps=1e-4)
        else: eq(res[0], ref[0]); eq(res[1], ref[1])
    with learn.no_bar(): ref = learn.predict(files[3], with_input=True)
    res = learn.fast_predict(files[3], with_input=True)
    eq(len(res), 4); eq(res[0], ref[0])

def test_item_kinds(single):
    "paths, str, PIL (lazy and loaded), HWC arrays and tensors, bytes: the file's answer, and fastai's"
    learn,files = single
    items = odd_items(files)
    res = learn.fast_get_preds(items, bs=4, with_decoded=True)
    ref = ref_preds(learn, files[:6], bs=4, with_decoded=True)
    close(res[0], ref[0], eps=EPS); eq(res[2], ref[2])
    # fastai itself, given the same in-memory items (it cannot take a lazily opened PIL image: index 1)
    mem = [items[i] for i in (2,3,4,5)]
    with learn.no_bar(): fa = learn.get_preds(dl=learn.dls.test_dl(mem, rm_type_tfms=0, bs=4))[0]
    close(learn.fast_get_preds(mem)[0], fa, eps=EPS)

def test_batch_sizes(single):
    learn,files = single
    ref = ref_preds(learn, files, bs=64)[0]
    for bs in (1, 7, 64):
        close(learn.fast_get_preds(files, bs=bs)[0], ref, eps=EPS)
    close(learn.fast_get_preds(iter(files[:5]))[0], ref[:5], eps=EPS)
    eq(learn.fast_get_preds(files[:1], fully_decoded=True)[-1], [learn.fast_predict(files[0])[0]])
    fails(lambda: learn.fast_get_preds([]), contains='empty')

def test_workers_same_order(single):
    learn,files = single
    a = learn.fast_get_preds(files, bs=8, fully_decoded=True)
    b = learn.fast_get_preds(files, bs=8, fully_decoded=True, num_workers=2)
    eq(a[0], b[0]); eq(a[-1], b[-1])

@pytest.mark.parametrize('nw', [0, 2])
def test_bad_item_named(single, nw):
    learn,files = single
    bad = files[:5] + [Path('/nonexistent/cat.jpg')] + files[5:9]
    with pytest.raises(Exception, match=r'item 5 \(/nonexistent/cat.jpg\)'): learn.fast_get_preds(bad, bs=4, num_workers=nw)
    with pytest.raises(ItemError, match=r'item 0 \(float\)'): learn.fast_get_preds([0.5])

def test_learner_untouched(single):
    learn,files = single
    pipes = [learn.dls.valid.after_item, learn.dls.valid.after_batch] + [tl.tfms for tl in learn.dls.valid_ds.tls]
    before = [p.split_idx for p in pipes]
    learn.model.train()
    learn.fast_get_preds(files[:4]); learn.fast_predict(files[0])
    assert not learn.model.training  # left in eval mode, as fastai's `get_preds` leaves it
    eq([p.split_idx for p in pipes], before)
    assert Learner.get_preds.__module__=='fastai.learner' and Learner.predict.__module__=='fastai.learner'
    same(learn.fast_pipes, learn.fast_pipes)

def test_vocab_decode_checked(single):
    learn,files = single
    fi_state(learn).pop('pipes', None)
    learn.fast_get_preds(files[:8], fully_decoded=True)
    assert learn.fast_pipes.vocab_ok is True
