# Sourced by scripts/test: the Debian packages the test suite drives for real, installed only
# where missing and only where we can (root with apt-get). Without one, the tests that need it
# skip and say why; nothing else depends on them.
#   softhsm2    the XKS proxy's PKCS#11 backing (tests/kms/test_xks_pkcs11.py)
#   cpio        GNU cpio reads our EIF ramdisks (tests/runtime/test_eif_unpack.py)
#   jq          the README's recipes build policy files with it (tests/integration/test_readme.py)
#   openssl     independent checks of KMS signatures and public keys
#   postgresql  the KMS key store on PostgreSQL: tests/pg_server.py runs initdb + postgres from
#               /usr/lib/postgresql/<major>/bin in a temporary directory (tests/kms/test_pg*.py)
set -euo pipefail

_wanted=()
command -v softhsm2-util >/dev/null 2>&1 || _wanted+=(softhsm2)
command -v cpio >/dev/null 2>&1 || _wanted+=(cpio)
command -v jq >/dev/null 2>&1 || _wanted+=(jq)
command -v openssl >/dev/null 2>&1 || _wanted+=(openssl)
{ command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; } ||
    _wanted+=(postgresql)
if [ ${#_wanted[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${_wanted[*]} (Debian packages the tests use)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq "${_wanted[@]}" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${_wanted[@]}" >/dev/null 2>&1; } ||
            echo "==> could not install ${_wanted[*]}: the tests that need them will be skipped" >&2
    else
        echo "==> missing ${_wanted[*]} (not root, or no apt-get): the tests that need them will be skipped" >&2
    fi
fi
unset _wanted
