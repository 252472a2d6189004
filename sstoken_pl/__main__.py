import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["evaluate"]:
        from sstoken_pl.eval_cli import main as evaluate

        evaluate(sys.argv[2:])
    elif sys.argv[1:2] == ["score"]:
        from sstoken_pl.score_cli import main as score

        score(sys.argv[2:])
    else:
        from sstoken_pl.cli import main

        main()
