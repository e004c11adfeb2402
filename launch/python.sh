# Sourced by manual.sh and torchrun.sh: sets PY, the interpreter that runs mlora. PYTHON when
# set; else the python3 on PATH when it has mlora and torch (an activated environment mlora
# was installed into); else this checkout's .venv/bin/python (what `make setup` makes) when
# there is one; else python3.
# (the checkout, found through links to the scripts: ~/bin/x -> launch/x looked in ~)
ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
# (from /: python3 run in the checkout finds its mlora/ there, torch or not)
python3_has_mlora() { (cd / && python3 -c 'import importlib.util as u, sys
sys.exit(not (u.find_spec("mlora") and u.find_spec("torch")))') >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif ! python3_has_mlora && [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
