#!/bin/sh
# The server image's entrypoint: `asr serve` on $ASR_HOST:$ASR_PORT (0.0.0.0:50051) for every
# model bundle mounted under $ASR_MODELS (/models), each served under its directory's name.
# $ASR_DEFAULT_MODEL names the default model (else the first name in sort order).
# Arguments are passed on to `asr serve` (e.g. --max-streams 16 --metrics-port 9090); with a
# --model among them, the mounted directories are not scanned.
set -eu
models=${ASR_MODELS:-/models}
default=${ASR_DEFAULT_MODEL:-}

case " $* " in
  *" --model "* | *" --model="*) ;;
  *)
    if [ -n "$default" ]; then
      [ -f "$models/$default/config.json" ] || {
        echo "ASR_DEFAULT_MODEL=$default: no bundle at $models/$default" >&2
        exit 2
      }
      set -- "$@" --model "$default=$models/$default"
    fi
    for dir in "$models"/*/; do
      name=$(basename "$dir")
      [ "$name" != "$default" ] && [ -f "$dir/config.json" ] || continue
      set -- "$@" --model "$name=${dir%/}"
    done
    case " $* " in
      *" --model "*) ;;
      *)
        echo "no model bundle under $models: mount one as a volume at $models/NAME," >&2
        echo "e.g. docker run -v \$PWD/exp/demo/bundle:$models/demo:ro ..." >&2
        exit 2
        ;;
    esac
    ;;
esac
exec asr serve --host "${ASR_HOST:-0.0.0.0}" --port "${ASR_PORT:-50051}" "$@"
