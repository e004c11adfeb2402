from mlora.cli import main

raise SystemExit(main())
