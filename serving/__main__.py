from serving.cli.main import main

raise SystemExit(main())
