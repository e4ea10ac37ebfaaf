import sys

if __name__ == "__main__":
    try:
        from phoenix.train.run import main

        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while importing: phoenix.train.run says the rest
        sys.exit(130)
