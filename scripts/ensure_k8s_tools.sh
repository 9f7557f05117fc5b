#!/usr/bin/env bash
# The tools `make test` checks k8s/ with (scripts/k8s_check.py): kustomize, kubeconform and kube-score,
# pinned, built with `go install` from the Go module proxy into a cache outside the repo. A tool whose
# pinned version is already there is not rebuilt, so this is cheap to call from `make` every time.
set -euo pipefail

CACHE="${PREFSTREAM_CACHE_DIR:-$HOME/.cache/prefstream}"
BIN="$CACHE/bin"
TOOLS=(
  "kustomize sigs.k8s.io/kustomize/kustomize/v5 v5.8.1"
  "kubeconform github.com/yannh/kubeconform/cmd/kubeconform v0.7.0"
  "kube-score github.com/zegl/kube-score/cmd/kube-score v1.20.0"
)

if ! command -v go >/dev/null 2>&1; then
  echo "ensure_k8s_tools: Go is not on PATH; install Go 1.22 or newer to build kustomize, kubeconform, kube-score" >&2
  exit 1
fi

mkdir -p "$BIN"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOBIN="$BIN" GOFLAGS=-mod=mod
pids=()
for entry in "${TOOLS[@]}"; do
  read -r name module version <<<"$entry"
  stamp="$BIN/.$name-$version"
  if [ -x "$BIN/$name" ] && [ -f "$stamp" ]; then
    continue
  fi
  echo "ensure_k8s_tools: building $name $version (first run only)" >&2
  ( go install "$module@$version" && touch "$stamp" ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
