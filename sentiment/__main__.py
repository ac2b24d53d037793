"""`python -m sentiment ...` is the `sentiment` command."""

from sentiment.cli import main

raise SystemExit(main())
