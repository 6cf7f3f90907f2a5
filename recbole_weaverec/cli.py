"""The ``run_recbole_weaverec.py`` command."""
import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(
        description="Train and evaluate a recbole-weaverec model or any RecBole model. Extra --key=value arguments "
                    "override config files, as in RecBole. --eval_mode=uni29 scores the true item against 29 "
                    "sampled ones (default: full ranking).")
    p.add_argument("--model", "-m", default=None, help="model name (ours or RecBole's; recbole:NAME forces RecBole's)")
    p.add_argument("--dataset", "-d", default=None, help="dataset name under data_path (default: toys-sample)")
    p.add_argument("--config_files", default=None, help="space-separated YAML files")
    # RecBole's multi-process keys (see recbole_weaverec/distributed.py and docs/scaling.md)
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (default 1)")
    p.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default: nproc)")
    p.add_argument("--ip", default="localhost", help="address of the machine running global rank 0")
    p.add_argument("--port", default="5678", help="free TCP port on that machine")
    p.add_argument("--offset", "--group_offset", dest="group_offset", type=int, default=0,
                   help="global rank of this machine's first process (machine k of M: k*nproc)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)
    from recbole_weaverec.config import ConfigError
    from recbole_weaverec.quick_start import run
    from recbole_weaverec.registry import UnknownModelError
    from recbole_weaverec.runfiles import Terminated

    files = args.config_files.split() if args.config_files else None
    model = args.model
    try:
        if model is None and not files and not any(a.startswith("--model=") for a in extra):
            from recbole_weaverec.quick_start import DEFAULT_MODEL
            model = DEFAULT_MODEL
        run(model=model, dataset=args.dataset, config_file_list=files, cmd_args=extra, nproc=args.nproc,
            world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
    except (ConfigError, UnknownModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a folder where a file should be: name the path
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where} (nothing of this run was kept)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: this run's log, TensorBoard folder and checkpoint were removed", file=sys.stderr)
        return 130
    except Terminated as e:
        print("terminated (SIGTERM): this run's log, TensorBoard folder and checkpoint were removed",
              file=sys.stderr)
        return e.code
    return 0
