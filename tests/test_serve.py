"fastinfer serve: the real server in a subprocess on a free loopback port; every reply right, every error its status; always shut down"
import io, os, signal, time, pytest, httpx
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.serve import ServerProcess



@pytest.fixture(scope='module')
def model(single, tmp_path_factory):
    learn,files = single
    d = tmp_path_factory.mktemp('serve')
    return learn,files,learn.export_onnx(d/'m.onnx'),d

def post(url, data, ct='image/png', **kw): return httpx.post(url + '/predict', content=data, headers={'Content-Type': ct, **kw.pop('headers', {})}, timeout=60, **kw)

def test_replies_equal_fast_predict(model):
    "16 clients at once: every reply is fast_predict's on the same bytes"
    learn,files,fn,_ = model
    ref = {i: learn.fast_predict(f.read_bytes()) for i,f in enumerate(files[:16])}
    with ServerProcess(fn, '--max-batch', '8', '--max-wait-ms', '20') as s:
        with ThreadPoolExecutor(16) as ex:
            res = list(ex.map(lambda i: post(s.url, files[i%16].read_bytes()), range(64)))
        for i,r in enumerate(res):
            eq(r.status_code, 200)
            lbl,idx,probs = ref[i%16]
            j = r.json(); eq(j['label'], lbl); eq(j['index'], int(idx))
            assert abs(j['probability']-probs.max().item()) <= 1e-5
            eq([k for k,_ in j['topk']][0], lbl)
        # multipart, and a batch with a bad file in the middle: aligned
        r = httpx.post(s.url + '/predict?topk=2', files={'file': ('a.png', files[0].read_bytes(), 'image/png')}, timeout=60)
        eq(r.json()['label'], ref[0][0]); eq(len(r.json()['topk']), 2)
        parts = [('files', ('a.png', files[0].read_bytes())), ('files', ('b.png', b'junk')), ('files', ('c.png', files[1].read_bytes()))]
        r = httpx.post(s.url + '/predict_batch', files=parts, timeout=60).json()
        eq(len(r), 3); eq(r[0]['label'], ref[0][0]); assert 'not an image' in r[1]['error']; eq(r[2]['label'], ref[1][0])
        from prometheus_client.parser import text_string_to_metric_families
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(s.url + '/metrics').text)}
        assert {'fastinfer_requests', 'fastinfer_request_seconds', 'fastinfer_batch_size', 'fastinfer_queue_depth', 'fastinfer_errors'} <= set(fams)
        n = sum(x.value for x in fams['fastinfer_requests'].samples if x.name=='fastinfer_requests_total' and x.labels['status']=='200')
        assert n >= 65
        assert max(x.value for x in fams['fastinfer_batch_size'].samples if x.name=='fastinfer_batch_size_count') >= 1
        eq(httpx.get(s.url + '/health').json(), {'status': 'ok'})
        assert 'fastinfer' in httpx.get(s.url + '/').text

def test_bad_inputs_get_their_status(model, tmp_path):
    learn,files,fn,_ = model
    good = files[0].read_bytes()
    buf = io.BytesIO(); Image.new('RGB', (3000, 2000)).save(buf, format='PNG')
    with ServerProcess(fn, '--max-body-mb', '0.5', '--api-key', 'sekret') as s:
        auth = {'Authorization': 'Bearer sekret'}
        eq(post(s.url, good).status_code, 401)
        eq(post(s.url, good, headers={'Authorization': 'Bearer nope'}).status_code, 401)
        cases = [(b'', 400, 'empty body'), (b'this is not an image', 400, 'not an image'), (good[:len(good)//2], 400, 'cannot decode'),
                 (os.urandom(600_000), 413, 'over the limit')]
        for data,status,msg in cases:
            r = post(s.url, data, headers=auth)
            eq(r.status_code, status); assert msg in r.json()['error'], r.json()
        r = post(s.url, good, ct='text/plain', headers=auth)
        eq(r.status_code, 415); assert 'unsupported content type' in r.json()['error']
        r = post(s.url, good, headers=auth)
        eq(r.status_code, 200); eq(r.json()['label'], learn.fast_predict(good)[0])  # still up, still right
    # a decompression bomb: a small file whose header promises too many pixels
    from fastinfer.serve import decode, HTTPError
    p = load(fn)
    with pytest.raises(HTTPError, match='decompression bomb'): decode(p, buf.getvalue(), max_pixels=1_000_000)
    eq(decode(p, good, max_pixels=1_000_000)[0].shape, p.prep(good).shape)

def test_overload_and_timeout(model):
    "a full queue gives 503 with Retry-After, past the timeout 504; every request gets an answer"
    learn,files,fn,_ = model
    data = files[0].read_bytes()
    with ServerProcess(fn, '--max-queue', '1', '--max-batch', '1', '--max-wait-ms', '0') as s:
        with ThreadPoolExecutor(32) as ex: res = list(ex.map(lambda i: post(s.url, data), range(96)))
        codes = [r.status_code for r in res]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        assert all(r.headers['retry-after']=='1' for r in res if r.status_code==503)
        eq(post(s.url, data).status_code, 200)
    with ServerProcess(fn, '--timeout-s', '0.000001') as s:
        r = post(s.url, data)
        eq(r.status_code, 504); assert 'no answer within' in r.json()['error']

def test_sigterm_finishes_in_flight(model):
    learn,files,fn,_ = model
    data = files[0].read_bytes()
    # the batcher holds the requests for 3 s: 1 s to connect even on a loaded machine (0.1 s was once too short), then SIGTERM
    with ServerProcess(fn, '--max-wait-ms', '3000', '--max-batch', '64') as s:
        with ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(post, s.url, data) for _ in range(8)]
            time.sleep(1.0)  # they are waiting in the batcher now
            s.proc.send_signal(signal.SIGTERM)
            res = [f.result() for f in futs]
        eq([r.status_code for r in res], [200]*8)
        eq(s.proc.wait(60), 0)

def test_serves_a_pkl(model):
    "a fastai .pkl is served through the learner's own pipelines, with a warning that it runs pickled code"
    learn,files,_,d = model
    learn.export(d/'m.pkl')
    with ServerProcess(d/'m.pkl', '--backend', 'torch') as s:
        r = post(s.url, files[2].read_bytes())
        lbl,idx,probs = learn.fast_predict(files[2].read_bytes(), backend='torch')
        eq(r.json()['label'], lbl); assert abs(r.json()['probability']-probs.max().item()) <= 1e-5
        s.proc.send_signal(signal.SIGTERM); s.proc.wait(60)
        assert 'runs the code in it' in s.proc.stderr.read()

def test_training_mode_pkl_batched(root, tmp_path):
    "a `.pkl` whose model was saved in training mode, 8 clients at once with batching on: every reply is fastai's `predict`"
    from conftest import learner
    learn,files = learner('train', root)
    learn.model.train(); learn.export(tmp_path/'t.pkl')
    with learn.no_bar(): ref = [learn.predict(f) for f in files[:8]]
    with ServerProcess(tmp_path/'t.pkl', '--max-batch', '4', '--max-wait-ms', '50') as s:
        with ThreadPoolExecutor(8) as ex: res = list(ex.map(lambda i: post(s.url, files[i%8].read_bytes()), range(24)))
    for i,r in enumerate(res):
        eq(r.status_code, 200)
        lbl,idx,probs = ref[i%8]
        eq(r.json()['label'], lbl); assert abs(r.json()['probability']-probs.max().item()) <= 1e-5
