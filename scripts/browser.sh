# Sourced by scripts/test.sh: the browser tests drive Debian's Chromium. Install it when it is
# missing and this machine allows it (root and apt-get); otherwise export the reason, and the
# browser tests are skipped with it (tests/test_chainlit_browser.py reads QWENRUN_BROWSER_SKIP).
QWENRUN_CHROMIUM=${QWENRUN_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$QWENRUN_CHROMIUM" ]; then
    if [ "$(id -u)" != 0 ]; then
        export QWENRUN_BROWSER_SKIP="$QWENRUN_CHROMIUM is missing and installing Debian's chromium needs root (sudo apt-get install chromium)"
    elif ! command -v apt-get >/dev/null 2>&1; then
        export QWENRUN_BROWSER_SKIP="$QWENRUN_CHROMIUM is missing and there is no apt-get to install Debian's chromium"
    else
        echo "installing Debian's chromium for the browser tests (apt-get) ..." >&2
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); then
            export QWENRUN_BROWSER_SKIP="apt-get install chromium failed; install it to run the browser tests"
        fi
    fi
    if [ -n "${QWENRUN_BROWSER_SKIP:-}" ]; then
        echo "warning: the browser tests will be skipped: $QWENRUN_BROWSER_SKIP" >&2
    fi
fi
