"""`python -m backbones {list,extract,train}`."""
from ._cli import main

raise SystemExit(main())
