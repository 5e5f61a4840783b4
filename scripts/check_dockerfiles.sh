#!/usr/bin/env bash
# Checks the container images' Dockerfiles without a Docker engine (none runs on CI's machine):
#   1. hadolint (installed into .venv by scripts/setup.sh) lints each Dockerfile; any finding,
#      style level included, fails.
#   2. Every COPY/ADD source taken from the build context (the repository root) exists in the
#      repository and is not excluded by .dockerignore. COPY --from=<stage> is skipped.
# The path check first runs on a small Dockerfile with a missing source, so a parser that
# silently finds no COPY lines cannot pass.
# Usage: bash scripts/check_dockerfiles.sh [DOCKERFILE...] (default: k8s/docker/*.Dockerfile)
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT=${HADOLINT:-.venv/bin/hadolint}
if [ ! -x "$HADOLINT" ]; then
  HADOLINT=$(command -v hadolint || true)
fi
if [ -z "$HADOLINT" ]; then
  echo "check_dockerfiles: hadolint not found (.venv/bin/hadolint or PATH); run 'bash scripts/setup.sh'" >&2
  exit 1
fi

if [ "$#" -gt 0 ]; then
  files=("$@")
else
  files=(k8s/docker/*.Dockerfile)
fi
for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "check_dockerfiles: no such Dockerfile: $f" >&2; exit 1; }
done

# Prints one line per COPY/ADD source that is missing or .dockerignore'd; exits 1 if any.
check_paths() {
  python3 - "$@" <<'PY'
import fnmatch, json, os, shlex, sys

def ignore_patterns(root):
    path = os.path.join(root, ".dockerignore")
    if not os.path.exists(path):
        return []
    pats = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line)
    return pats

def ignored(rel, pats):
    # .dockerignore: the last matching pattern wins; a pattern also excludes everything below
    # a folder it matches; "!" re-includes.
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for p in pats:
        neg = p.startswith("!")
        p = p[1:] if neg else p
        p = p.strip("/")
        if p.startswith("./"):
            p = p[2:]
        if any(fnmatch.fnmatchcase(pre, p) for pre in prefixes):
            result = not neg
    return result

def instructions(text):
    # Joins backslash continuations and drops comment lines (as Docker does inside them too).
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out

def sources(instr):
    words = instr.split(None, 1)
    if len(words) < 2 or words[0].upper() not in ("COPY", "ADD"):
        return None
    rest = words[1].strip()
    flags = []
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.strip()
    if any(f.startswith("--from") for f in flags):
        return []
    if rest.startswith("<<"):
        return []  # heredoc: no context source
    args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return args[:-1]  # the last argument is the destination

root, files = sys.argv[1], sys.argv[2:]
pats = ignore_patterns(root)
bad = 0
for df in files:
    seen = 0
    for instr in instructions(open(df).read()):
        srcs = sources(instr)
        if srcs is None:
            continue
        for src in srcs:
            seen += 1
            if "://" in src:
                continue  # ADD of a URL: not from the context
            rel = os.path.normpath(src).lstrip("/")
            if rel.startswith(".."):
                print(f"{df}: {src}: outside the build context")
                bad += 1
            elif not os.path.exists(os.path.join(root, rel)):
                print(f"{df}: {src}: not in the repository")
                bad += 1
            elif ignored(rel, pats):
                print(f"{df}: {src}: excluded by .dockerignore")
                bad += 1
    print(f"{df}: {seen} build-context COPY/ADD sources checked", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

# Self-test of the path check: one present source, one missing, one from another stage.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/ctx/present"
printf 'x\n' >"$tmp/ctx/present/file"
cat >"$tmp/Selftest.Dockerfile" <<'EOF'
FROM scratch AS a
COPY present/file \
     /a
FROM scratch
COPY --from=a /not/in/context /b
COPY ["missing/dir", "/c"]
EOF
if out=$(check_paths "$tmp/ctx" "$tmp/Selftest.Dockerfile" 2>/dev/null) \
  || [ "$out" != "$tmp/Selftest.Dockerfile: missing/dir: not in the repository" ]; then
  echo "check_dockerfiles: self-test of the COPY path check failed; it printed: $out" >&2
  exit 1
fi

status=0
echo "check_dockerfiles: $("$HADOLINT" --version)"
for f in "${files[@]}"; do
  if ! "$HADOLINT" --no-color --failure-threshold style "$f"; then
    echo "check_dockerfiles: hadolint found problems in $f" >&2
    status=1
  fi
done
if ! check_paths . "${files[@]}"; then
  echo "check_dockerfiles: the COPY/ADD sources above are missing from, or excluded from, the build context" >&2
  status=1
fi
[ "$status" -eq 0 ] && echo "check_dockerfiles: ${#files[@]} Dockerfiles OK"
exit "$status"
