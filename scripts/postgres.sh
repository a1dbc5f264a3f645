#!/usr/bin/env bash
# Makes sure a PostgreSQL server's binaries (initdb, pg_ctl, postgres) are installed, so the
# registry tests can start a throwaway server on loopback (tests/helpers/registry.py).
# Idempotent and quiet: does nothing when the binaries are already there.  Installing needs
# root and apt-get (Debian's `postgresql` package); elsewhere it says what is missing and
# exits 0, and the PostgreSQL tests then skip (or fail, when CI is set).
# Prints nothing on success unless it installed something.
set -euo pipefail

have_pg() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null 2>&1
}

if have_pg; then
  exit 0
fi

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "postgres.sh: PostgreSQL is not installed and cannot be installed here (needs root and apt-get)" >&2
  exit 0
fi

echo "postgres.sh: installing PostgreSQL (Debian package 'postgresql')" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# The package's post-install creates and starts a default cluster where a service manager
# exists; the tests never use it (they run their own server on a free loopback port).
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
have_pg || { echo "postgres.sh: installed, but initdb is still not found" >&2; exit 1; }
