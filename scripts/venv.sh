# Sourced by run.sh and test.sh: `ensure_installed EXTRA` installs iotgw into .venv (editable,
# so the Cython modules are compiled in place) unless the stamp says this very source was
# installed already with that extra. The stamp is keyed on what the build reads: pyproject.toml,
# setup.py and the Cython sources (.pyx/.pxd/.pxi, and the shadow modules compiled from .py).
# Nothing changed: nothing runs, so a start takes seconds and prints no build warnings.
ensure_installed() {
  local extra="$1"  # "" or "test"
  local stamp=.venv/.iotgw-installed key
  key=$(cat pyproject.toml setup.py gateway/_native/*.pyx gateway/_native/*.pxd \
        gateway/_native/*.pxi shadow/*.pxd shadow/model.py shadow/store.py shadow/redis.py \
        | sha256sum | cut -d' ' -f1)
  [ -x .venv/bin/python ] || python3 -m venv .venv
  if [ -f "$stamp" ] && compgen -G 'gateway/_native/mqtt*.so' >/dev/null && grep -qx "$key" "$stamp" && { [ -z "$extra" ] || grep -qx "extra:$extra" "$stamp"; }; then
    return 0
  fi
  rm -f "$stamp"
  .venv/bin/python -m pip install -q --upgrade pip
  # setuptools' own notices (deprecations in its build of an editable install) are not ours
  # to act on; errors still show.
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
  { echo "$key"; [ -z "$extra" ] || echo "extra:$extra"; } > "$stamp"
}
