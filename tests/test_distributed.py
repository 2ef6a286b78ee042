"ray_predict on a local 2-CPU Ray cluster: every row equals fast_get_preds, bad files become error rows, nothing dropped; shut down always"
import ctypes, json, math, signal, pytest, torch
import numpy as np
from pathlib import Path
from fastcore.test import test_eq as eq
from fastinfer.all import *

ray = pytest.importorskip('ray')

class _stack_t(ctypes.Structure): _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int), ('ss_size', ctypes.c_size_t)]
class _sigaction_t(ctypes.Structure): _fields_ = [('handler', ctypes.c_void_p), ('mask', ctypes.c_ulong*16), ('flags', ctypes.c_int), ('restorer', ctypes.c_void_p)]

def _signal_state():
    "This thread's alternate signal stack and every signal's C-level action (`sigaltstack`, `sigaction`)"
    libc = ctypes.CDLL(None, use_errno=True)
    st = _stack_t(); libc.sigaltstack(None, ctypes.byref(st))
    acts = {}
    for n in range(1, signal.SIGRTMIN):
        a = _sigaction_t()
        if libc.sigaction(n, None, ctypes.byref(a))==0: acts[n] = a
    return st, acts

def _restore_signal_state(state):
    "Put back what `_signal_state` saved: Ray's shutdown leaves its 64 kB alternate stack in place and resets the fault handlers to the default"
    # (ray-project/ray#65749, open): so pytest's faulthandler printed nothing when a later test crashed
    libc = ctypes.CDLL(None, use_errno=True)
    st,acts = state
    if st.ss_flags & 2: st = _stack_t(None, 2, 0)  # SS_DISABLE: there was none
    libc.sigaltstack(ctypes.byref(st), None)
    now = _signal_state()[1]
    for n,a in acts.items():
        if now[n].handler != a.handler: libc.sigaction(n, ctypes.byref(a), None)

@pytest.fixture(scope='module')
def cluster():
    "A local Ray cluster in this process; afterwards, the process's signal state as it was (faulthandler's handlers and stack included)"
    before = _signal_state()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try: yield
    finally:
        ray.shutdown()
        _restore_signal_state(before)
        after = _signal_state()
        eq((after[0].ss_sp, after[0].ss_size), (before[0].ss_sp, before[0].ss_size))
        eq({n: a.handler for n,a in after[1].items()}, {n: a.handler for n,a in before[1].items()})

def test_rows_equal_fast_get_preds(cluster, single, tmp_path):
    from fastinfer.distributed import ray_predict
    learn,files = single
    fn = learn.export_onnx(tmp_path/'m.onnx')
    (tmp_path/'bad.png').write_bytes(b'not an image')
    items = [str(f) for f in files[:20]] + [str(tmp_path/'bad.png'), str(tmp_path/'missing.png')] + [str(f) for f in files[20:30]]
    rows = ray_predict(items, fn, bs=8, topk=2).take_all()
    eq(len(rows), len(items))
    by = {r['item']: r for r in rows}
    eq(sorted(by), sorted(items))
    good = [o for o in items if 'bad' not in o and 'missing' not in o]
    probs,_,dec = learn.fast_get_preds(good, with_decoded=True)
    for o,p,d in zip(good, probs, dec):
        r = by[o]
        assert r['error']=='', r
        eq(r['label'], learn.dls.vocab[d])
        assert np.abs(np.asarray(r['probs'])-p.numpy()).max() <= 1e-5 and abs(r['probability']-p.max().item()) <= 1e-5
        eq(json.loads(r['topk'])[0][0], r['label'])
    assert 'not an image' in by[items[20]]['error'] or 'UnidentifiedImageError' in by[items[20]]['error']
    assert 'No such file' in by[items[21]]['error'] or 'FileNotFoundError' in by[items[21]]['error']
    assert math.isnan(by[items[21]]['probability']) and by[items[21]]['label']==''

def test_parquet_and_dataset_input(cluster, single, tmp_path):
    import ray.data, pyarrow.parquet as pq
    from fastinfer.distributed import ray_predict
    learn,files = single
    fn = learn.export_onnx(tmp_path/'m.onnx')
    (tmp_path/'bad.png').write_bytes(b'junk')
    # a bad item in one batch and not in the others: every batch's columns must still have one type
    ds = ray.data.from_items([{'path': str(f)} for f in files[:11]] + [{'path': str(tmp_path/'bad.png')}])
    ray_predict(ds, fn, bs=4).write_parquet(str(tmp_path/'out'))
    t = pq.read_table(str(tmp_path/'out')).to_pandas()
    eq(len(t), 12); assert {'item', 'label', 'probability', 'probs', 'error'} <= set(t.columns)
    bad = t[t.item==str(tmp_path/'bad.png')].iloc[0]
    probs = np.asarray(bad.probs)
    assert bad.error and np.isnan(probs).all() and probs.shape==(len(learn.dls.vocab),)

def test_cli_ray(cluster, single, tmp_path):
    "fastinfer predict --ray joins the running cluster (here, in-process) and writes Parquet"
    import pyarrow.parquet as pq
    from fastinfer.cli import main
    learn,files = single
    fn = learn.export_onnx(tmp_path/'m.onnx')
    main(['predict', str(fn), *map(str, files[:6]), '-o', str(tmp_path/'p.parquet'), '--ray'])
    eq(pq.read_table(str(tmp_path/'p.parquet')).num_rows, 6)

def test_missing_ray_message(monkeypatch):
    import sys
    from fastinfer.distributed import ray_predict
    monkeypatch.setitem(sys.modules, 'ray', None)
    with pytest.raises(ImportError, match=r'pip install "fastinfer\[ray\]"'): ray_predict(['a.png'], 'm.onnx')

def test_tabular_parquet(cluster, tmp_path):
    "A tabular export over a Parquet dataset: each row keeps its id, good rows equal `fast_get_preds`, bad rows carry an error naming the column"
    import ray.data, pandas as pd
    from fastinfer.distributed import ray_predict
    from fastinfer.cli import main
    from fastinfer.test_utils import tab_learner
    learn,df = tab_learner('single', tmp_path/'t')
    fn = learn.export_onnx(tmp_path/'t.onnx')
    d = df.drop(columns=['y', 'yb1', 'yb2', 'yr', 'yr2']).iloc[:100].astype({'x2': float})
    d.insert(0, 'id', np.arange(100)*7)
    d.loc[[5, 60], 'x2'] = np.nan  # no fill value: training had no NaN in x2
    d.to_parquet(tmp_path/'rows.parquet')
    out = ray_predict(ray.data.read_parquet(str(tmp_path/'rows.parquet')), fn, bs=32, keep=['id'], topk=2).to_pandas()
    main(['predict', str(fn), str(tmp_path/'rows.parquet'), '-o', str(tmp_path/'cli.parquet'), '--ray', '--id-col', 'id'])
    for o in (out, pd.read_parquet(tmp_path/'cli.parquet')):
        o = o.set_index('id').loc[d.id]
        eq(len(o), 100)
        bad = o.error!=''
        eq(list(np.flatnonzero(bad)), [5, 60]); assert o.error.iloc[5].startswith("column 'x2' is missing a value"), o.error.iloc[5]
        good = [i for i in range(100) if i not in (5, 60)]
        p,_,dec = learn.fast_get_preds(d.iloc[good], with_decoded=True, backend='torch')
        eq(list(o.label.iloc[good]), [learn.dls.vocab[i] for i in dec.tolist()])
        assert np.abs(o.probability.iloc[good].to_numpy() - p.max(1).values.numpy()).max() <= 1e-5
