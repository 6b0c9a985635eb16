from gptcore.cli import main

raise SystemExit(main())
