"Tabular learners: fast_get_preds / fast_predict / fast_iter_preds against fastai's own, every backend forced, fastai's quirks, bad rows, ONNX export and the torch-free runtime"
import json, subprocess, sys, warnings, pytest, torch
import numpy as np, pandas as pd
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.tabproc import RowError
from fastinfer.runtime import native_bf16
from fastinfer.test_utils import TAB_KINDS, tab_learner

EPS = 1e-5
_cache = {}

@pytest.fixture(scope='session', params=TAB_KINDS)
def tab(request, tmp_path_factory):
    k = request.param
    if k not in _cache: _cache[k] = tab_learner(k, tmp_path_factory.mktemp(f'tab-{k}'))
    learn,df = _cache[k]
    learn.model.train()  # as `tabular_learner` leaves it before `fit`: every path must run it in eval mode
    return k,learn,df

YS = ['y', 'yb1', 'yb2', 'yr', 'yr2']
def feats(df): return df.drop(columns=YS)  # with its target columns, fastai's `test_dl` also returns the encoded targets

def fastai_preds(learn, df, **kw):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(df), with_input=True, with_decoded=True, **kw)

def odd_rows(df):
    "The table with fastai's quirks to reproduce: an unseen category, a missing one, NaN in the filled columns, an extra column"
    d = df.iloc[:40].copy()
    if 'cat_s' in d: d.loc[d.index[0], 'cat_s'] = 'purple'; d.loc[d.index[1], 'cat_s'] = None
    if 'cat_i' in d: d.loc[d.index[2], 'cat_i'] = 7
    d.loc[d.index[3:6], 'x0'] = np.nan
    d['extra'] = 'ignored'
    return d

@pytest.mark.parametrize('backend', ['torch', 'onnxruntime', 'openvino', 'auto'])
def test_get_preds_parity(tab, backend):
    "inputs identical, decoded identical, probabilities bit-identical on torch and within 1e-5 elsewhere; fastai's types"
    kind,learn,df = tab
    d = feats(odd_rows(df) if backend=='torch' else df)
    ref = fastai_preds(learn, d)
    learn.model.train()
    res = learn.fast_get_preds(d, with_input=True, with_decoded=True, backend=backend)
    assert not learn.model.training
    eq([type(o) for o in res], [type(o) for o in ref])
    eq(res[0][0], ref[0][0]); eq(res[0][1], ref[0][1])
    if backend=='torch': eq(res[1], ref[1])
    else: assert max_dp(res[1], ref[1]) <= EPS
    if kind.startswith('regression'): close(res[3], ref[3], eps=EPS)
    else: eq(res[3], ref[3])

# torch's autocast rounds as native bf16 does, emulated or not; OpenVINO is asked for bf16 only where the CPU has it
@pytest.mark.parametrize('backend', ['torch'] + (['openvino'] if has_openvino() and native_bf16() else []))
def test_bf16(tab, backend, monkeypatch):
    "`precision='bf16'` forced, as on a CPU with native bf16 (mocked where it is missing): fastai's types and inputs, fp32 outputs within bf16's rounding, one row too"
    import fastinfer.engine as engine
    monkeypatch.setattr(engine, 'native_bf16', lambda: True)
    kind,learn,df = tab
    d = feats(df)
    ref = fastai_preds(learn, d)
    try:
        res = learn.fast_get_preds(d, with_input=True, with_decoded=True, precision='bf16', backend=backend)
        eq([type(o) for o in res], [type(o) for o in ref])
        eq(res[0][0], ref[0][0]); eq(res[0][1], ref[0][1])
        eq(res[1].dtype, ref[1].dtype)  # back in fp32, as fastai's
        assert max_dp(res[1], ref[1]) <= 5e-2, max_dp(res[1], ref[1])  # up to 1.9e-2 measured (regression, torch)
        with learn.no_bar(): r = learn.predict(d.iloc[0])
        p = learn.fast_predict(d.iloc[0], precision='bf16', backend=backend)
        eq([type(o) for o in p[1:]], [type(o) for o in r[1:]]); assert isinstance(p[0], pd.DataFrame)  # as `test_predict_parity`
        eq(p[2].dtype, r[2].dtype)
        assert max_dp(p[2], r[2]) <= 5e-2
    finally: learn.fast_reset()

def test_targets(tab):
    "rows that hold the target columns: `get_preds`' second element is fastai's targets, their dtype and shape included"
    kind,learn,df = tab
    d = df.iloc[:50].copy()
    ref,res = fastai_preds(learn, d),learn.fast_get_preds(d, with_input=True, with_decoded=True)
    assert ref[2] is not None
    eq(res[2].dtype, ref[2].dtype); eq(res[2], ref[2])
    eq(learn.fast_get_preds([dict(r) for _,r in d.iloc[:5].iterrows()])[1], ref[2][:5])  # dict rows with their targets too
    eq(learn.fast_get_preds(feats(d))[1], None)  # no target columns, no targets: as fastai
    if kind=='single':  # a label the vocab lacks is `_apply_cats`' -1 (fastai's own loss then fails on it)
        d['y'] = d.y.astype(object); d.loc[d.index[1], 'y'] = 'never seen'
        eq(learn.fast_get_preds(d)[1][:3, 0].tolist(), [ref[2][0, 0].item(), -1, ref[2][2, 0].item()])

def test_one_row_fast_path(tab):
    "one dict row (its continuous columns in one vectorised pass) encodes exactly as the same row of a DataFrame (column by column)"
    kind,learn,df = tab
    p,d = learn.fast_tab,feats(odd_rows(df)).drop(columns='extra')
    for i in range(8):
        row = {k: None if isinstance(v, float) and v!=v else v for k,v in d.iloc[i].to_dict().items()}
        a,b = p.encode(row),p.encode(d.iloc[i:i+1])
        eq(a[0], b[0]); eq(a[1].tobytes(), b[1].tobytes()); eq(a[2], b[2])
    if 'x2' in p.cont_names:  # a problem the vectorised pass cannot name goes the column way
        with pytest.raises(RowError, match="column 'x2' is continuous, and '7' is not a number"): learn.fast_predict(dict(row, x2='7'))

def test_fully_decoded(tab):
    kind,learn,df = tab
    preds,_,dec,full = learn.fast_get_preds(df.iloc[:20], with_decoded=True, fully_decoded=True)
    eq(len(full), 20)
    v = learn.dls.vocab if not kind.startswith('regression') else None
    for d,f in zip(dec, full):
        if kind=='multi': eq(f, [o for o,b in zip(v, d.tolist()) if b])
        elif kind.startswith('regression'): close(torch.tensor(f), d, eps=EPS)
        else: eq(f, v[int(d)])

def test_predict_parity(tab):
    kind,learn,df = tab
    for i in (0, 3, 7):
        row = feats(df).iloc[i]
        with learn.no_bar(): ref = learn.predict(row)
        learn.model.train()
        full,dec,probs = learn.fast_predict(row)
        assert max_dp(probs, ref[2]) <= EPS
        if kind.startswith('regression'): close(dec, ref[1], eps=EPS)
        else: eq(dec, ref[1])
        assert isinstance(full, pd.DataFrame) and len(full)==1
        eq(learn.fast_predict(dict(row))[2], probs)  # a dict row: the same answer
    y = learn.dls.valid_ds.y_names
    assert set(y) <= set(full.columns)
    if kind=='single': eq(full[y[0]].iloc[0], learn.dls.vocab[int(dec)])

def test_batch_size_and_chunks(tab):
    "any batch size gives the same rows; `fast_iter_preds` over chunks gives `fast_get_preds`' rows in order"
    kind,learn,df = tab
    ref = learn.fast_get_preds(df, with_decoded=True, backend='torch')
    eq(learn.fast_get_preds(df, bs=learn.dls.valid.bs, backend='torch')[0], ref[0])  # torch batches as `test_dl` does
    import fastinfer.tabular as ft
    with pytest.MonkeyPatch.context() as m:  # the procs encode several chunks of whole batches: still bit-identical to fastai
        m.setattr(ft, 'ENCODE_ROWS', 130)
        eq(learn.fast_get_preds(df, backend='torch')[0], ref[0])
        d = df.iloc[:300].copy(); d.loc[d.index[200], 'x2'] = np.nan  # a bad row in the second chunk, named by its place
        if 'x2' in learn.fast_tab.cont_names:
            with pytest.raises(RowError, match=r"row 200: column 'x2'"): learn.fast_get_preds(d, backend='torch')
    for bs in (1, 100, 4096): assert max_dp(learn.fast_get_preds(df, bs=bs, backend='torch')[0], ref[0]) <= 1e-6
    chunks = (df.iloc[i:i+150] for i in range(0, len(df), 150))
    idx,preds,dec = zip(*learn.fast_iter_preds(chunks, bs=50, backend='torch'))
    eq(torch.cat(idx), torch.arange(len(df)))
    close(torch.cat(preds), ref[0], eps=1e-6)
    if kind.startswith("regression"): close(torch.cat(dec), ref[2], eps=1e-6)
    else: eq(torch.cat(dec), ref[2])

def test_quirks(root_single=None):
    "an unseen or missing category is #na#; a pandas category column is encoded by its own codes (fastai's quirk), with a warning; int and bool classes"
    learn,df = _cache.get('single') or tab_learner('single')
    p = learn.fast_tab
    eq(p.classes['cat_i'][1:], [0, 1, 2, 3]); assert all(type(o) is int for o in p.classes['cat_i'][1:])
    eq(p.classes['cat_b'][1:], [False, True]); eq(p.classes['cat_s'][1:], ['0', 'blue', 'green', 'grey', 'red'])
    cats = p.encode(dict(cat_s='purple', cat_i=9, cat_b=None, x0=1., x1=1., x2=1, x3=1.))[0]
    eq(cats[0][:3].tolist(), [0, 0, 0])
    eq(p.encode(dict(cat_s=0, cat_i=0, cat_b=False, x0=1., x1=1., x2=1, x3=1.))[0][0][:3].tolist(), [0, 1, 1])  # int 0 is not '0'
    d = df.iloc[:30].copy()
    d['cat_s'] = d.cat_s.astype(pd.CategoricalDtype(['red', 'green', 'blue', 'grey', '0']))
    ref = fastai_preds(learn, d)
    with pytest.warns(UserWarning, match="column 'cat_s' has a pandas category dtype whose categories differ"):
        res = learn.fast_get_preds(d, with_input=True, backend='torch')
    eq(res[0][0], ref[0][0]); eq(res[1], ref[1])

@pytest.mark.parametrize('backend', ['torch', 'onnxruntime', 'openvino'])
def test_category_code_past_the_classes(backend):
    "a pandas category column with more categories than the learner has classes: a row whose code has no embedding raises naming row and column on every backend (OpenVINO had answered from zeros), or is skipped keeping every other row"
    learn,df = _cache.get('single') or tab_learner('single')
    d = feats(df).iloc[:12].copy()
    d['cat_s'] = d.cat_s.astype(pd.CategoricalDtype(learn.fast_tab.classes['cat_s'][1:] + ['purple']))
    d.loc[d.index[3], 'cat_s'] = 'purple'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the category dtype's own warning, tested in `test_quirks`
        with pytest.raises(RowError, match=r"row 3: column 'cat_s' is a pandas category whose value 'purple' has the code 5, past the 5 classes"):
            learn.fast_get_preds(d, backend=backend)
        preds,_,errors = learn.fast_get_preds(d, backend=backend, on_error='skip')
        ref = fastai_preds(learn, d.drop(index=d.index[3]))  # fastai fails on the whole table (IndexError): its answers without the row
    eq([i for i,_ in errors], [3]); eq(len(preds), 12)
    assert torch.isnan(preds[3]).all()
    assert max_dp(preds[[i for i in range(12) if i!=3]], ref[1]) <= EPS

@pytest.mark.parametrize('backend', ['torch', 'onnxruntime', 'openvino'])
def test_nan_without_fillmissing(backend):
    "no `FillMissing`: a NaN is a bad row named with its column, on every backend (fastai answers NaN and class 0; OpenVINO answered real-looking probabilities), and so is an infinite value"
    learn,df = _cache.get('nofill') or _cache.setdefault('nofill', tab_learner('nofill'))
    d = feats(df).iloc[:10].copy()
    d.loc[d.index[2], 'x0'],d.loc[d.index[4], 'x1'] = np.nan,-np.inf
    with pytest.raises(RowError, match=r"row 2: column 'x0' is missing a value \(NaN\), and the learner has no FillMissing to fill it"):
        learn.fast_get_preds(d, backend=backend)
    with pytest.raises(RowError, match=r"row 0: column 'x0' is missing a value"): learn.fast_predict(dict(d.iloc[2]), backend=backend)
    preds,_,dec,errors = learn.fast_get_preds(d, backend=backend, on_error='skip', with_decoded=True)
    eq(errors[1], (4, "row 4: column 'x1' is -inf, and the model can only answer NaN for it"))
    eq([i for i,_ in errors], [2, 4]); eq(dec[[2, 4]].tolist(), [-1, -1])
    ref = fastai_preds(learn, d)
    assert torch.isnan(ref[1][[2, 4]]).all()  # fastai's answer for them
    keep = [i for i in range(10) if i not in (2, 4)]
    assert max_dp(preds[keep], ref[1][keep]) <= EPS; eq(dec[keep], ref[3][keep])

def test_float32_means():
    "every continuous column float, so fastai's means are float32 (`df_shrink`): a float32, float16 or int16 column is normalized in float32 as fastai does it, bit for bit, by the learner and by the exported spec"
    learn,df = tab_learner('allfloat')
    eq(tab_spec(learn)['tabular']['norm_dtype'], 'float32')
    d = feats(df).iloc[:64].copy()
    d['x0'],d['x1'],d['x3'] = d.x0.astype('float32'),d.x1.astype('float16'),(d.x3*10).astype('int16')  # x0, x1 have NaN to fill
    ref = fastai_preds(learn, d)
    res = learn.fast_get_preds(d, with_input=True, backend='torch')
    eq(res[0][1], ref[0][1]); eq(res[1], ref[1])
    from fastinfer.tabproc import TabProcs
    cats,conts,_ = TabProcs(json.loads(json.dumps(tab_spec(learn)))).encode(d)  # what the torch-free runtime reads from the file
    eq(torch.from_numpy(conts), ref[0][1]); eq(torch.from_numpy(cats), ref[0][0])
    for i in range(8):  # one row of the table (numpy float32, float16 and int16 values in it) is encoded as the table's row
        eq(learn.fast_tab.encode(d.iloc[i])[1][0], conts[i])

def test_bad_rows(tab):
    "a missing column, NaN where training had none, a value that is not a number: raise naming row and column, or skip keeping every row"
    kind,learn,df = tab
    if kind=='nocont': return
    d = df.iloc[:12].copy().astype({'x2': object})
    d.loc[d.index[4], 'x2'] = 'seven'
    with pytest.raises(RowError, match=r"row 4: column 'x2' is continuous, and 'seven' is not a number"): learn.fast_get_preds(d)
    preds,_,dec,errors = learn.fast_get_preds(d, with_decoded=True, on_error='skip')
    eq([i for i,_ in errors], [4]); eq(len(preds), 12)
    assert torch.isnan(preds[4]).all() and not torch.isnan(preds[[0,1,2,3,5]]).any()
    close(preds[5:], learn.fast_get_preds(df.iloc[5:12])[0], eps=EPS)
    with pytest.raises(RowError, match=r"row 0: column 'x3' is missing"): learn.fast_get_preds(df.drop(columns='x3').iloc[:5])
    *_,errors = learn.fast_get_preds(df.drop(columns='x3').iloc[:5], on_error='skip')
    eq(len(errors), 5)
    if kind in ('single', 'multi', 'regression'):
        d = df.iloc[:6].copy(); d.loc[d.index[2], 'x3'] = np.nan
        with pytest.raises(RowError, match=r"row 2: column 'x3' is missing a value \(NaN\), and had none in training"): learn.fast_get_preds(d)
        with pytest.raises(RowError, match="column 'x2' is missing"): learn.fast_predict({k:v for k,v in dict(df.iloc[0]).items() if k!='x2'})
        # one dict row with a list in it (a JSON row, say) is that row with a bad value, not a dict of columns
        row = dict(feats(df).iloc[0])
        with pytest.raises(RowError, match=r"row 0: column 'x0' is continuous, and \[1, 2\] is not a number"): learn.fast_predict(dict(row, x0=[1, 2]))
        with pytest.raises(RowError, match=r"row 0: column 'cat_s' has the unhashable value \['red'\]"): learn.fast_predict(dict(row, cat_s=['red']))

def test_export_onnx(tab, tmp_path):
    "each kind to one ONNX file, loaded by `fastinfer.runtime` (ONNX Runtime and OpenVINO) in a process where torch and fastai cannot be imported: the same answers"
    kind,learn,df = tab
    fn = learn.export_onnx(tmp_path/f'{kind}.onnx', example_items=df.iloc[:16])
    rows = df.iloc[:50]
    rows.to_csv(tmp_path/'rows.csv', index=False)
    ref = learn.fast_get_preds(rows, with_decoded=True, backend='torch')
    code = f"""
import sys, json
sys.modules['torch'] = None; sys.modules['fastai'] = None  # any import of them fails
import numpy as np, pandas as pd
from fastinfer.runtime import load
p = load({str(fn)!r})
df = pd.read_csv({str(tmp_path/'rows.csv')!r})
probs,dec = p.get_preds(df, bs=16)
rows = [{{k: (None if isinstance(v, float) and v!=v else v) for k,v in r.items()}} for r in df.to_dict('records')]
probs2 = p.get_preds(rows)[0]
one = p.predict(rows[0])
ov = load({str(fn)!r}, backend='openvino')  # OpenVINO needs no torch either
assert ov.backend=='openvino'
np.save({str(tmp_path/'p.npy')!r}, np.stack([probs, probs2, ov.get_preds(df, bs=16)[0]]))
print(json.dumps([one[0] if not isinstance(one[0], list) else one[0]]))
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-3000:]
    got = np.load(tmp_path/'p.npy')
    for g in got: assert max_dp(torch.from_numpy(g), ref[0]) <= 1e-5, kind
    if kind=='single': eq(json.loads(r.stdout.strip().splitlines()[-1])[0], learn.dls.vocab[int(ref[2][0])])

def test_spec_validation(tmp_path):
    import onnx
    learn,df = _cache.get('single') or tab_learner('single')
    fn = learn.export_onnx(tmp_path/'m.onnx')
    spec = json.loads(onnx.load(str(fn)).metadata_props[0].value)
    def lie(s, name):
        m = onnx.load(str(fn)); m.metadata_props[0].value = json.dumps(s); onnx.save(m, str(tmp_path/name)); return tmp_path/name
    t = spec['tabular']
    with pytest.raises(ValueError, match="field 'means' is missing"): load(lie({**spec, 'tabular': {k:v for k,v in t.items() if k!='means'}}, 'a.onnx'))
    with pytest.raises(ValueError, match="no classes for the categorical column 'cat_s'"): load(lie({**spec, 'tabular': {**t, 'classes': {}}}, 'b.onnx'))
    with pytest.raises(ValueError, match='input x_cont has shape .* but its spec has 3 such columns'):
        load(lie({**spec, 'tabular': {**t, 'cont_names': t['cont_names'][:3], 'fill': {}, 'means': {}, 'stds': {}}}, 'c.onnx'))
    with pytest.raises(ValueError, match='unknown fastinfer export format version 3'): load(lie({**spec, 'version': 3}, 'd.onnx'))

def test_vision_only_methods(tmp_path):
    "the methods that run image pipelines say so, and name the tabular ones, instead of an AttributeError about `TabularModel`"
    learn,df = _cache.get('single') or tab_learner('single')
    for what,f in [('quantize', lambda: learn.quantize(df.iloc[:8])), ('fast_tta', lambda: learn.fast_tta(df.iloc[:8])),
                   ('this export', lambda: learn.export_jit(tmp_path/'m.pt')), ('this export', lambda: learn.export_program(tmp_path/'m.pt2'))]:
        with pytest.raises(NotImplementedError, match=f"{what} needs a vision learner, and this one's data is a TabularPandas; a tabular learner has fast_get_preds"): f()

def test_other_procs_fall_back(tmp_path):
    "a proc fastinfer does not reproduce: fastai's own answers, with one warning that names it"
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, TabularProc
    class Clip(TabularProc):
        def encodes(self, to): to.conts = to.conts.clip(-1, 1)
    df = pd.DataFrame(dict(a=np.linspace(-2, 2, 64), b=['x', 'y']*32)); df['y'] = np.where(df.a > 0, 'pos', 'neg')
    learn = tabular_learner(TabularDataLoaders.from_df(df, path=tmp_path, cat_names=['b'], cont_names=['a'], y_names='y', procs=[Categorify, Clip], bs=16), layers=[8])
    with pytest.warns(UserWarning, match='its procs Clip are not'): res = learn.fast_get_preds(df, with_decoded=True)
    with learn.no_bar(): ref = learn.get_preds(dl=learn.dls.test_dl(df), with_decoded=True)
    eq(res[0], ref[0]); eq(res[2], ref[2])
