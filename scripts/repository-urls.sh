#!/usr/bin/env bash
# Sets package.json's repository, homepage and bugs URLs to the GitHub repository a workflow runs
# in (GITHUB_SERVER_URL, GITHUB_REPOSITORY, as GitHub Actions sets them). The publish job runs it
# before `napi create-npm-dirs` (which copies `repository` into the platform packages): npm's
# provenance check compares `repository.url` with the repository that built the package, so a
# fork or a moved repository publishes with its own address. The release rehearsal runs it too.
set -euo pipefail
: "${GITHUB_SERVER_URL:?GITHUB_SERVER_URL is not set (GitHub Actions sets it)}"
: "${GITHUB_REPOSITORY:?GITHUB_REPOSITORY is not set (GitHub Actions sets it: owner/name)}"
[[ $GITHUB_REPOSITORY =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] ||
  { echo "repository-urls: GITHUB_REPOSITORY must be owner/name, got '$GITHUB_REPOSITORY'" >&2; exit 1; }
repo_url="${GITHUB_SERVER_URL%/}/${GITHUB_REPOSITORY}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
npm pkg set "repository.url=git+${repo_url}.git" "homepage=${repo_url}#readme" "bugs.url=${repo_url}/issues"
echo "repository-urls: package.json now names ${repo_url}"
