"Tabular models on every surface: `fastinfer predict` over CSV and Parquet, `fastinfer serve` with JSON rows (the real server), Ray Data over Parquet"
import json, math, pytest, httpx
import numpy as np, pandas as pd
from concurrent.futures import ThreadPoolExecutor
from fastcore.test import test_eq as eq
from fastinfer.all import *
from fastinfer.cli import main
from fastinfer.serve import ServerProcess
from fastinfer.test_utils import tab_learner

EPS = 1e-5
_cache = {}

def tab(kind, tmp_path_factory):
    if kind not in _cache:
        d = tmp_path_factory.mktemp(f'surf-{kind}')
        learn,df = tab_learner(kind, d)
        _cache[kind] = learn,df,learn.export_onnx(d/f'{kind}.onnx'),d/f'{kind}.pkl'
    return _cache[kind]

def rows(df, n=300):
    "The feature columns of `df` with an id, and bad rows: text in a continuous column (4), a NaN where training had none (9)"
    d = df.drop(columns=['y', 'yb1', 'yb2', 'yr', 'yr2']).iloc[:n].copy()
    d.insert(0, 'id', [f'r{i}' for i in range(len(d))])
    d['x2'] = d['x2'].astype(object); d.loc[d.index[4], 'x2'] = 'abc'
    d.loc[d.index[9], 'x2'] = np.nan
    return d.reset_index(drop=True)

def check_out(learn, d, o, bad):
    "Output frame `o` of table `d` against `fast_get_preds` on the good rows: aligned, in order, with an error on each bad row"
    eq(list(o['id']), list(d['id']))
    err = o['error'].fillna('').astype(str)
    eq(sorted(np.flatnonzero(err!='').tolist()), sorted(bad))
    assert "column 'x2'" in err[4] and "column 'x2'" in err[9], err[[4, 9]]
    good = [i for i in range(len(d)) if i not in bad]
    p,_,dec = learn.fast_get_preds(d.iloc[good], with_decoded=True, backend='torch')
    og = o.iloc[good]
    if 'label' in o:
        eq(list(og['label']), [learn.dls.vocab[i] for i in dec.tolist()])
        assert np.abs(og['probability'].to_numpy() - p.max(1).values.numpy()).max() <= EPS
        assert og.iloc[0]['topk'] and json.loads(og.iloc[0]['topk'])[0][0]==og.iloc[0]['label']
        assert o['label'].isna()[bad].all()
    elif 'labels' in o:
        voc = list(learn.dls.vocab)
        eq([str(s) if isinstance(s, str) else '' for s in og['labels']], [';'.join(v for v,b in zip(voc, r) if b) for r in dec.tolist()])
    else:
        for j,y in enumerate(learn.dls.valid_ds.y_names): assert np.abs(og[y].to_numpy() - p[:, j].numpy()).max() <= EPS
        assert o[learn.dls.valid_ds.y_names[0]].isna()[bad].all()

@pytest.mark.parametrize('kind,src,out,model', [('single', 'csv', 'csv', 'onnx'), ('single', 'parquet', 'parquet', 'pkl'),
                                               ('multi', 'csv', 'parquet', 'onnx'), ('regression2', 'parquet', 'csv', 'onnx')])
def test_cli_table(kind, src, out, model, tmp_path, tmp_path_factory, capsys):
    learn,df,onnx,pkl = tab(kind, tmp_path_factory)
    d = rows(df)
    if src=='csv': d.to_csv(tmp_path/'in.csv', index=False)
    else: d.assign(x2=pd.to_numeric(d.x2, errors='coerce')).to_parquet(tmp_path/'in.parquet')  # Parquet holds no text in a number column
    bad = [4, 9]  # in Parquet, row 4 is a NaN where training had none too
    # chunks of 128 rows: the bad rows and the chunk edges fall in different chunks
    main(['predict', str(onnx if model=='onnx' else pkl), str(tmp_path/f'in.{src}'), '-o', str(tmp_path/f'o.{out}'), '--id-col', 'id',
          '--on-error', 'skip', '--topk', '2', '--chunk', '128', '--bs', '50'])
    assert '2 of 300 rows failed' in capsys.readouterr().err
    o = pd.read_csv(tmp_path/'o.csv') if out=='csv' else pd.read_parquet(tmp_path/'o.parquet')
    check_out(learn, d, o, bad)

def test_cli_parquet_categories_by_value(tmp_path, tmp_path_factory, capsys):
    "a Parquet file's category column (pandas writes a dictionary, in its own order) is read by value: every label right, no codes warning"
    learn,df,onnx,_ = tab('single', tmp_path_factory)
    d = rows(df).drop(index=[4, 9]).reset_index(drop=True)
    d['x2'] = d.x2.astype(int)
    d.assign(cat_s=d.cat_s.astype(pd.CategoricalDtype(['red', 'grey', 'green', 'blue', '0']))).to_parquet(tmp_path/'in.parquet')
    main(['predict', str(onnx), str(tmp_path/'in.parquet'), '-o', str(tmp_path/'o.csv'), '--id-col', 'id', '--chunk', '128'])
    assert 'pandas category dtype' not in capsys.readouterr().err
    o,(p,_,dec) = pd.read_csv(tmp_path/'o.csv'),learn.fast_get_preds(d, with_decoded=True, backend='torch')
    eq(list(o['id']), list(d['id'])); eq(list(o['label']), [learn.dls.vocab[i] for i in dec.tolist()])
    assert np.abs(o['probability'].to_numpy() - p.max(1).values.numpy()).max() <= EPS

def test_cli_table_errors(tmp_path, tmp_path_factory):
    learn,df,onnx,_ = tab('single', tmp_path_factory)
    d = rows(df, 20)
    d.to_csv(tmp_path/'in.csv', index=False)
    with pytest.raises(SystemExit, match=r"row 4: column 'x2' is continuous, and 'abc' is not a number"):
        main(['predict', str(onnx), str(tmp_path/'in.csv'), '-o', str(tmp_path/'o.csv')])
    with pytest.raises(SystemExit, match=r"has no column 'key' \(--id-col\)"):
        main(['predict', str(onnx), str(tmp_path/'in.csv'), '-o', str(tmp_path/'o.csv'), '--id-col', 'key', '--on-error', 'skip'])
    d.drop(columns=['x3']).to_csv(tmp_path/'lack.csv', index=False)
    main(['predict', str(onnx), str(tmp_path/'lack.csv'), '-o', str(tmp_path/'o.csv'), '--on-error', 'skip'])
    o = pd.read_csv(tmp_path/'o.csv')
    eq(len(o), 20); assert (o['error']=="row 0: column 'x3' is missing").iloc[0] and o['label'].isna().all()

def test_parquet_needs_pyarrow(tmp_path, tmp_path_factory, monkeypatch):
    import builtins
    learn,df,onnx,_ = tab('single', tmp_path_factory)
    rows(df, 12).to_csv(tmp_path/'in.csv', index=False)
    real = builtins.__import__
    def imp(name, *a, **kw):
        if name.startswith('pyarrow'): raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, '__import__', imp)
    with pytest.raises(SystemExit, match=r'fastinfer\[parquet\]'): main(['predict', str(onnx), str(tmp_path/'in.csv'), '-o', str(tmp_path/'o.parquet')])

def jrow(d, i)->dict:
    "Row `i` of `d` as a JSON object: NaN is null"
    return {k: None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, 'item') else v for k,v in d.iloc[i].items()}

def post(s, path, body, **kw): return httpx.post(s.url + path, json=body, timeout=60, **kw)

@pytest.mark.parametrize('kind', ['single', 'regression'])
def test_serve_json_rows(kind, tmp_path_factory):
    "16 clients send JSON rows, one in ten bad: every good reply is `fast_get_preds`'s row, every bad one a 400 naming the column"
    learn,df,onnx,_ = tab(kind, tmp_path_factory)
    d = rows(df, 40).drop(columns=['id'])
    good = [i for i in range(len(d)) if i not in (4, 9)]
    p,_,dec = learn.fast_get_preds(d.iloc[good], with_decoded=True, backend='torch')
    ref = dict(zip(good, zip(p, dec)))
    body = lambda i: jrow(d, i)
    with ServerProcess(onnx, '--max-batch', '8', '--max-wait-ms', '10', '--api-key', 'k', '--max-body-mb', '0.01') as s:
        h = {'Authorization': 'Bearer k'}
        with ThreadPoolExecutor(16) as ex: res = list(ex.map(lambda i: post(s, '/predict', body(i%40), headers=h), range(120)))
        for k,r in enumerate(res):
            i = k%40
            if i not in ref:
                eq(r.status_code, 400); assert "column 'x2'" in r.json()['error'] and 'row' not in r.json()['error'], r.json(); continue
            eq(r.status_code, 200)
            pr,de = ref[i]
            if kind=='single': eq(r.json()['label'], learn.dls.vocab[int(de)]); assert abs(r.json()['probability']-pr.max().item()) <= EPS
            else: assert np.abs(np.array(r.json()['prediction']) - pr.numpy()).max() <= EPS
        r = post(s, '/predict_batch', [body(0), body(4), 'x', body(1)], headers=h).json()
        eq(len(r), 4); assert 'error' in r[1] and 'error' in r[2] and 'error' not in r[0] and 'error' not in r[3]
        # every error its status
        eq(post(s, '/predict', body(0)).status_code, 401)
        r = post(s, '/predict', {k:v for k,v in body(0).items() if k!='x3'}, headers=h); eq(r.status_code, 400); assert "column 'x3' is missing" in r.json()['error']
        r = post(s, '/predict', [body(0)], headers=h); eq(r.status_code, 400); assert 'expected a JSON object' in r.json()['error']
        eq(post(s, '/predict_batch', body(0), headers=h).status_code, 400)
        r = post(s, '/predict', {**body(0), 'x1': [1, 2]}, headers=h); eq(r.status_code, 400); assert "'x1'" in r.json()['error']
        r = httpx.post(s.url + '/predict', content=b'{"x0": ', headers={**h, 'Content-Type': 'application/json'}); eq(r.status_code, 400)
        r = httpx.post(s.url + '/predict', content=b'\x89PNG\r\n', headers={**h, 'Content-Type': 'image/png'})
        eq(r.status_code, 415); assert 'tabular model' in r.json()['error']
        eq(post(s, '/predict_batch', [body(0)]*400, headers=h).status_code, 413)
        # null is a missing value: x0 is filled as in training, x2 (no NaN in training) is an error
        r = post(s, '/predict', {**body(0), 'x0': None}, headers=h); eq(r.status_code, 200)
        nan_row = d.iloc[[0]].assign(x0=np.nan)
        if kind=='single': assert abs(r.json()['probability'] - learn.fast_get_preds(nan_row, backend='torch')[0].max().item()) <= EPS
        eq(post(s, '/predict', {**body(0), 'x2': None}, headers=h).status_code, 400)
        rd = httpx.get(s.url + '/ready').json()
        eq(rd['kind'], 'tabular'); eq(rd['task'], kind); eq(rd['columns'], ['cat_s', 'cat_i', 'cat_b', 'x0', 'x1', 'x2', 'x3'])
        page = httpx.get(s.url + '/').text
        for c in rd['columns']: assert f'data-col="{c}"' in page

def test_serve_pkl_and_image_model_refuses_json(single, tmp_path_factory):
    "A tabular `.pkl` serves the same replies; an image model answers a JSON row with 415"
    learn,df,_,pkl = tab('single', tmp_path_factory)
    d = rows(df, 12).drop(columns=['id'])
    row = jrow(d, 0)
    with ServerProcess(pkl, '--backend', 'torch') as s:
        r = post(s, '/predict', row).json()
        p,_,dec = learn.fast_get_preds(d.iloc[[0]], with_decoded=True, backend='torch')
        eq(r['label'], learn.dls.vocab[int(dec[0])]); assert abs(r['probability'] - p.max().item()) <= EPS
    ilearn,files = single
    with ServerProcess(ilearn.export_onnx(tmp_path_factory.mktemp('img')/'m.onnx'), '--backend', 'openvino') as s:
        eq(httpx.get(s.url + '/ready').json()['backend'], 'openvino')
        r = post(s, '/predict', row); eq(r.status_code, 415); assert 'image model' in r.json()['error']
        r = httpx.post(s.url + '/predict', content=files[0].read_bytes(), headers={'Content-Type': 'image/png'}, timeout=60).json()
        lbl,_,probs = ilearn.fast_predict(files[0], backend='torch')
        eq(r['label'], lbl); assert abs(r['probability'] - probs.max().item()) <= EPS

def test_cli_openvino(tmp_path, tmp_path_factory):
    "`--backend openvino` runs an `.onnx` export on OpenVINO: the rows ONNX Runtime writes"
    learn,df,onnx,_ = tab('single', tmp_path_factory)
    rows(df, 50).to_csv(tmp_path/'in.csv', index=False)
    for b in ('onnxruntime', 'openvino'):
        main(['predict', str(onnx), str(tmp_path/'in.csv'), '-o', str(tmp_path/f'{b}.csv'), '--on-error', 'skip', '--backend', b])
    a,o = pd.read_csv(tmp_path/'onnxruntime.csv'),pd.read_csv(tmp_path/'openvino.csv')
    eq(list(a.label.fillna('')), list(o.label.fillna(''))); assert np.nanmax(np.abs(a.probability - o.probability)) <= EPS
