#!/usr/bin/env bash
# make setup: install a Debian package the project needs when PRESENT (a shell test) fails; as root with
# apt-get it is installed, otherwise the install command is printed and setup goes on.
#   tools/require_system_package.sh PRESENT PACKAGE FEDORA_PACKAGE WHAT_NEEDS_IT
set -u
present=$1 package=$2 fedora=$3 why=$4
bash -c "$present" >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing $package ($why)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$package" || { apt-get update -q && apt-get install -y -q "$package"; }
else
  echo "$package is missing ($why). Install it with:"
  echo "  sudo apt-get install $package    (Fedora: sudo dnf install $fedora)"
fi
