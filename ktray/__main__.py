from ktray.cli import main

raise SystemExit(main())
