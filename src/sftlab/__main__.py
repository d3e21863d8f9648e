from sftlab.cli import main

raise SystemExit(main())
