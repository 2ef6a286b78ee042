"fastinfer predict: files, folders and lists in; CSV/JSONL out; errors.csv under skip; exit status 1 under raise"
import csv, json, subprocess, sys, pytest
from pathlib import Path
from fastcore.test import test_eq as eq
from fastinfer.all import *
from fastinfer.cli import expand_items

def run(*args):
    return subprocess.run([sys.executable, '-c', 'from fastinfer.cli import main; main()', *map(str, args)], capture_output=True, text=True, timeout=600)

@pytest.fixture(scope='module')
def model(single, tmp_path_factory):
    learn,files = single
    d = tmp_path_factory.mktemp('cli')
    learn.export(d/'m.pkl')
    learn.export_jit(d/'m.pt')
    return learn,files,d

def test_expand_items(model, tmp_path):
    learn,files,d = model
    (tmp_path/'list.txt').write_text('\n'.join(map(str, files[:3])) + '\n\n')
    folder = files[0].parent
    got = expand_items([files[5], tmp_path/'list.txt', folder])
    eq(got[:4], [files[5]] + files[:3])
    eq(len(got), 4 + len(list(folder.glob('*.png'))))  # the masks are PNGs too: a folder gives every image file in it
    assert all(g.suffix=='.png' for g in got)

def test_predict_csv_matches_fast_get_preds(model, tmp_path):
    learn,files,d = model
    r = run('predict', d/'m.pkl', *files[:10], '-o', tmp_path/'p.csv', '--topk', '2', '--bs', '4')
    assert r.returncode==0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path/'p.csv')))
    preds,_,dec = learn.fast_get_preds(files[:10], with_decoded=True)
    eq([row['item'] for row in rows], [str(f) for f in files[:10]])
    eq([row['label'] for row in rows], [learn.dls.vocab[i] for i in dec])
    for row,p in zip(rows, preds): assert abs(float(row['probability'])-p.max().item()) < 1e-5
    eq(len(json.loads(rows[0]['topk'])), 2)

def test_predict_skip_and_raise(model, tmp_path):
    learn,files,d = model
    items = files[:3] + [tmp_path/'missing.png'] + files[3:5]
    r = run('predict', d/'m.pkl', *items, '-o', tmp_path/'p.csv', '--on-error', 'skip')
    assert r.returncode==0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path/'p.csv')))
    eq(len(rows), 6); eq(rows[3]['label'], ''); eq(rows[3]['item'], str(tmp_path/'missing.png'))
    errs = list(csv.DictReader(open(tmp_path/'errors.csv')))
    eq([e['index'] for e in errs], ['3']); assert 'missing.png' in errs[0]['error']
    r = run('predict', d/'m.pkl', *items, '-o', tmp_path/'q.csv')
    eq(r.returncode, 1); assert 'item 3' in r.stderr and 'missing.png' in r.stderr

def test_predict_jit_jsonl(model, tmp_path):
    learn,files,d = model
    r = run('predict', d/'m.pt', *files[:6], tmp_path/'nope.png', '-o', tmp_path/'p.jsonl', '--on-error', 'skip')
    assert r.returncode==0, r.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path/'p.jsonl')]
    eq(len(rows), 7); eq(rows[-1]['label'], '')
    eq([row['label'] for row in rows[:6]], [learn.fast_predict(f)[0] for f in files[:6]])
    r = run('predict', d/'m.pt', tmp_path/'nope.png', '-o', tmp_path/'q.jsonl')
    eq(r.returncode, 1); assert 'nope.png' in r.stderr

def test_predict_training_mode_pkl(root, tmp_path):
    "`fastinfer predict` on a `.pkl` saved with its model in training mode gives fastai's labels and probabilities"
    from conftest import learner
    learn,files = learner('train', root)
    learn.model.train(); learn.export(tmp_path/'t.pkl')
    r = run('predict', tmp_path/'t.pkl', *files[:6], '-o', tmp_path/'p.csv', '--bs', '3')
    assert r.returncode==0, r.stderr[-2000:]
    with learn.no_bar(): ref = learn.get_preds(dl=learn.dls.test_dl(files[:6]), with_decoded=True)
    rows = list(csv.DictReader(open(tmp_path/'p.csv')))
    eq([row['label'] for row in rows], [learn.dls.vocab[i] for i in ref[2]])
    for row,p in zip(rows, ref[0]): assert abs(float(row['probability'])-p.max().item()) < 1e-5
