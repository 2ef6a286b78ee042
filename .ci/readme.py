"Render nbs/index.ipynb to README.md: markdown cells as they are, visible code cells as python blocks"
import json, sys
from pathlib import Path
root = Path(__file__).resolve().parent.parent
nb = json.loads((root/'nbs'/'index.ipynb').read_text())
out = []
for c in nb['cells']:
    src = ''.join(c['source']).strip()
    if not src or src.startswith('#| hide'): continue
    out.append(src if c['cell_type']=='markdown' else f'```python\n{src}\n```')
txt = '\n\n'.join(out) + '\n'
if '--check' in sys.argv:
    if (root/'README.md').read_text() != txt: sys.exit('README.md is out of date: run `make readme`')
else: (root/'README.md').write_text(txt)
