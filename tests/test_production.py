"Bad inputs, streaming, concurrency: nothing lost, nothing misaligned, nothing hung"
import math, os, subprocess, sys, threading, time, warnings, pytest, torch
import numpy as np
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.test_utils import odd_corpus
import fastinfer.preds as fpreds

@pytest.fixture(scope='module')
def odd(single, tmp_path_factory): return odd_corpus(tmp_path_factory.mktemp('odd'), single[1][0])

def fastai_preds(learn, item):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl([item], rm_type_tfms=0 if not isinstance(item, (str, Path)) else None))[0][0]

def test_valid_odd_inputs_match_fastai(single, odd):
    learn,_ = single
    items = [it for _,it,ok in odd if ok]
    res = learn.fast_get_preds(items, bs=4)[0]
    for (name,it,_),r in zip([o for o in odd if o[2]], res): close(r, fastai_preds(learn, it), eps=1e-5)

def test_invalid_inputs_raise_naming_item(single, odd):
    learn,_ = single
    for i,(name,it,ok) in enumerate(odd):
        if ok: continue
        with pytest.raises(ItemError, match=rf'item 1 \(') as e: learn.fast_get_preds([odd[4][1], it])
        if isinstance(it, Path): assert str(it) in str(e.value), name
        else: assert 'float64' in str(e.value)

def test_skip_keeps_every_row(single, odd):
    learn,_ = single
    items = [it for _,it,_ in odd]
    preds,targs,dec,full,errors = learn.fast_get_preds(items, bs=4, with_decoded=True, fully_decoded=True, on_error='skip')
    eq(len(preds), len(items)); eq(len(dec), len(items)); eq(len(full), len(items))
    bad = [i for i,(_,_,ok) in enumerate(odd) if not ok]
    eq([e[0] for e in errors], bad)
    for i,it,msg in errors: assert it is items[i] and f'item {i} (' in msg
    for i,(_,it,ok) in enumerate(odd):
        if ok: close(preds[i], fastai_preds(learn, it), eps=1e-5); assert dec[i] >= 0 and full[i] == learn.dls.vocab[dec[i]]
        else: assert torch.isnan(preds[i]).all() and dec[i] == -1 and full[i] is None

def test_skip_whole_batch_failed(single):
    learn,files = single
    bad = [Path('/nonexistent/a.png')]*3
    inp,preds,_,dec,errors = learn.fast_get_preds(bad + files[:2], bs=3, with_input=True, with_decoded=True, on_error='skip')
    eq(preds.shape, (5, len(learn.dls.vocab))); assert torch.isnan(preds[:3]).all() and not torch.isnan(preds[3:]).any()
    eq(dec[:3].tolist(), [-1]*3); eq(inp.shape[0], 5); assert torch.isnan(inp[:3]).all()
    eq(len(errors), 3)

def test_decompression_bomb(single, odd, monkeypatch):
    learn,_ = single
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000_000)
    big = [it for n,it,_ in odd if n.startswith('50-megapixel')][0]
    with pytest.raises(ItemError, match='DecompressionBombError'): learn.fast_get_preds([big])
    *_,errors = learn.fast_get_preds([big], on_error='skip')
    assert 'DecompressionBomb' in errors[0][2]

def test_bad_on_error(single):
    learn,files = single
    with pytest.raises(ValueError, match="expected 'raise' or 'skip'"): learn.fast_get_preds(files[:2], on_error='ignore')

def test_a_dataloader_is_refused(single, root):
    "`get_preds(dl=dls.test_dl(items))`'s habit: a DataLoader, vision's or a table's, is refused saying what to pass"
    from fastinfer.test_utils import tab_learner
    learn,files = single
    tl,df = tab_learner('single', root/'tab-dl')
    for l,dl in ((learn, learn.dls.test_dl(files[:4])), (tl, tl.dls.test_dl(df.iloc[:4]))):
        for f in (lambda: l.fast_get_preds(dl), lambda: list(l.fast_iter_preds(dl))):
            with pytest.raises(TypeError, match=f'fastinfer takes the items themselves, not a {type(dl).__name__}: pass what you would give `test_dl`'): f()
    with pytest.raises(TypeError, match='not a TfmdDL'): learn.fast_tta(learn.dls.test_dl(files[:4]))

def test_iter_preds_in_order(single):
    learn,files = single
    items = files*3
    # the same backend on both sides: 'auto' measures per batch size, and may pick another within 1e-5
    idx,preds,dec = zip(*learn.fast_iter_preds(items, bs=16, backend='torch'))
    eq(torch.cat(idx), torch.arange(len(items)))
    ref = learn.fast_get_preds(items, with_decoded=True, backend='torch')
    eq(torch.cat(preds), ref[0]); eq(torch.cat(dec), ref[2])
    out = list(learn.fast_iter_preds(files[:3] + [Path('/nope.png')], on_error='skip'))
    eq(len(out), 1); eq(out[0][3][0][0], 3)

def test_worker_stall_is_an_error(single, tmp_path, monkeypatch):
    learn,files = single
    fifo = tmp_path/'stall.png'
    os.mkfifo(fifo)  # opening it blocks forever: a stalled decode
    monkeypatch.setattr(fpreds, 'WORKER_TIMEOUT', 3)
    t0 = time.time()
    with pytest.raises(RuntimeError, match='crashed or stalled'): learn.fast_get_preds(files[:2] + [fifo], bs=2, num_workers=1)
    assert time.time()-t0 < 60

def test_worker_stall_retried(single, tmp_path, monkeypatch):
    "A worker that hangs once (as one forked while another thread held a lock can) is replaced, and no item is lost"
    learn,files = single
    mark,parent,get = tmp_path/'hung',os.getpid(),fpreds.ItemsDataset.__getitem__
    def getitem(self, i):
        if os.getpid()!=parent and i==9 and not mark.exists(): mark.touch(); time.sleep(600)
        return get(self, i)
    monkeypatch.setattr(fpreds.ItemsDataset, '__getitem__', getitem)
    monkeypatch.setattr(fpreds, 'WORKER_TIMEOUT', 3)
    with pytest.warns(UserWarning, match=r'stalled near items 8-15 .*from item 8 again in fresh workers'):
        res = learn.fast_get_preds(files, bs=8, num_workers=2, with_decoded=True, backend='torch')
    assert mark.exists()
    ref = learn.fast_get_preds(files, bs=8, with_decoded=True, backend='torch')
    eq(res[0], ref[0]); eq(res[2], ref[2])

def test_workers_ignore_inherited_garbage(single, tmp_path, monkeypatch):
    "A worker that collects garbage it inherited must not free an ONNX Runtime session there: that waits forever on threads it lacks"
    import gc
    from fastinfer.runtime import load
    learn,files = single
    fn = learn.export_onnx(tmp_path/'m.onnx')
    class Cycle: pass
    gc.disable()
    try:
        c = Cycle(); c.me,c.p = c,load(fn, threads=2)
        c.p.get_preds(files[:4]); time.sleep(0.5)  # its thread pool has run, and waits
        del c  # garbage now, which only the collector frees
        parent,get = os.getpid(),fpreds.ItemsDataset.__getitem__
        def getitem(self, i):
            if os.getpid()!=parent: gc.collect()
            return get(self, i)
        monkeypatch.setattr(fpreds.ItemsDataset, '__getitem__', getitem)
        monkeypatch.setattr(fpreds, 'WORKER_TIMEOUT', 10)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # no stall, so no retry
            res = learn.fast_get_preds(files[:16], bs=8, num_workers=2, backend='torch')[0]
    finally: gc.enable()
    eq(res, learn.fast_get_preds(files[:16], bs=8, backend='torch')[0])

def test_threads_match_serial(single):
    learn,files = single
    items = files[:10]
    serial = [learn.fast_predict(f) for f in items]
    batch = learn.fast_get_preds(files, bs=8)[0]
    out,errs = {},[]
    def work(k):
        try:
            for j in range(100):
                i = (k+j)%len(items)
                out[(k,j)] = (i, learn.fast_predict(items[i]))
            out[(k,'b')] = learn.fast_get_preds(files, bs=8)[0]
        except Exception as e: errs.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errs, errs
    for key,v in out.items():
        if key[1]=='b': eq(v, batch)
        else:
            i,r = v
            eq(r[0], serial[i][0]); eq(r[1], serial[i][1]); eq(r[2], serial[i][2])

RSS = """
import resource, sys, warnings
warnings.filterwarnings('ignore')
from fastinfer.all import *
from fastinfer.test_utils import synth_learner
learn,files = synth_learner('single', sys.argv[1], n=8)
n = int(sys.argv[2])
with learn.no_bar():
    for _ in learn.fast_iter_preds(files*(n//len(files)), bs=64): pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

def test_streaming_memory_flat(tmp_path):
    "peak RSS over 10k items is at most the 1k figure + the outputs + 100 MB"
    rss = {}
    for n in (1000, 10000):
        r = subprocess.run([sys.executable, '-c', RSS, str(tmp_path/str(n)), str(n)], capture_output=True, text=True, timeout=600)
        assert r.returncode==0, r.stderr[-2000:]
        rss[n] = int(r.stdout.split()[-1])/1024  # MB
    assert rss[10000] <= rss[1000] + 10000*3*4/1e6 + 100, rss

@pytest.mark.parametrize('kind', ['single', 'points', 'bw', 'rrc'])
@pytest.mark.parametrize('W,H', [(90,50), (50,90), (64,64)])
def test_orig_size_geometry(kind, W, H, root):
    "a dot drawn at a known source position, found in fastai's resized image, maps back to where it was drawn"
    from conftest import learner
    from fastinfer.runtime import points_to_orig, region
    learn,_ = learner(kind, root)
    p,r = learn.fast_pipes,size_spec(learn.fast_pipes.after_item)
    for x,y in [(W//2-3, H//2+2), (W//3, H//3+4)]:
        a = np.zeros((H,W,3), np.uint8); a[y:y+3, x:x+3] = 255
        t = p.item(Image.fromarray(a) if kind!='bw' else Image.fromarray(a).convert('L'))[0].float().sum(0)
        py,px = divmod(t.argmax().item(), t.shape[1])
        got = torch.from_numpy(points_to_orig([px+0.5, py+0.5], r, W, H))
        l,tp,sx,sy = region(r, W, H)
        assert (got-torch.tensor([x+1.5, y+1.5])).abs().max() <= 1.5*max(sx, sy)+1, (kind, W, H, x, y, got)

def test_orig_size_outputs(root):
    from conftest import learner
    from fastinfer.runtime import points_to_orig, region
    learn,files = learner('points', root)
    a = learn.fast_get_preds(files[:4], fully_decoded=True)[-1]
    b = learn.fast_get_preds(files[:4], fully_decoded=True, orig_size=True)[-1]
    r = size_spec(learn.fast_pipes.after_item)
    for f,pa,pb in zip(files, a, b):
        W,H = Image.open(f).size
        close(pb, torch.from_numpy(points_to_orig(torch.Tensor(pa).numpy(), r, W, H)), eps=1e-5); eq(type(pb), type(pa))
    learn,files = learner('segmentation', root)
    m = learn.fast_get_preds(files[:3], fully_decoded=True, orig_size=True)[-1]
    for f,mk in zip(files, m): eq(tuple(mk.shape), Image.open(f).size[::-1])
    with pytest.raises(ValueError, match='pass fully_decoded=True'): learn.fast_get_preds(files[:1], orig_size=True)
    learn,files = learner('single', root)
    with pytest.raises(ValueError, match='maps points and masks'): learn.fast_get_preds(files[:1], fully_decoded=True, orig_size=True)
