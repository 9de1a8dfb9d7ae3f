#!/usr/bin/env python3
"""Container health check: exit 0 when layerskip-serve's ``/health`` answers 200, else 1.

Uses only the standard library (the image has no curl). The port is ``LAYERSKIP_PORT``, the
same variable the server reads (default 8000).
"""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('LAYERSKIP_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
