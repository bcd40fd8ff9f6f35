from xmas.cli import main

raise SystemExit(main())
