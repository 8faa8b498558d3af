# bash completion for capsulectl(1)                                  -*- shell-script -*-
#
# Verbs and options are completed from this file; capsule and unit names are asked from capsuled
# itself (`capsulectl list -q`, `capsulectl units NAME -q`), through the same --address/-H the
# command line being completed uses, never prompting for a password and giving up after 2 s.
# Install as /usr/share/bash-completion/completions/capsulectl.

_capsulectl_query() {
    capsulectl "${_capsulectl_conn[@]}" --no-ask-password --timeout 2 "$@" 2>/dev/null
}

_capsulectl() {
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion || return
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi

    local verbs="list status create start stop restart remove enable disable set-limits units
        install-unit remove-unit start-unit stop-unit restart-unit enable-unit disable-unit run
        shell systemctl logs watch deploy rollback audit bundle can-i info"
    local global_opts="--json --no-ask-password --address -H --host --timeout --no-legend --help"
    local with_value="--address -H --host --timeout -u --unit -E --setenv --working-directory
        -n --lines -S --since --memory-max --tasks-max --cpu-weight --name --verb -o --output
        --key --pubkey --signer"
    local actions="read create remove manage manage-units run set-limits deploy start stop
        restart enable disable status logs audit rollback"

    # Find the verb and the positional arguments typed so far; remember --address/-H so the
    # names are asked from the same capsuled.
    local i word verb="" after_dashdash=""
    local -a args=()
    _capsulectl_conn=()
    for ((i = 1; i < cword; i++)); do
        word=${words[i]}
        if [[ -n $after_dashdash ]]; then
            args+=("$word")
            continue
        fi
        case $word in
            --) after_dashdash=1 ;;
            --address | -H | --host)
                _capsulectl_conn+=("$word" "${words[i + 1]}")
                ((i++))
                ;;
            --address=* | --host=*) _capsulectl_conn+=("$word") ;;
            -*)
                [[ " ${with_value//$'\n'/ } " == *" $word "* ]] && ((i++))
                ;;
            *)
                if [[ -z $verb ]]; then
                    verb=$word
                else
                    args+=("$word")
                fi
                ;;
        esac
    done

    case $prev in
        --address)
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$cur"))
            return
            ;;
        -H | --host)
            if declare -F _known_hosts_real >/dev/null; then
                _known_hosts_real -a -- "$cur"
            fi
            return
            ;;
        -u | --unit)
            if [[ $verb == logs && ${#args[@]} -ge 1 ]]; then
                COMPREPLY=($(compgen -W "$(_capsulectl_query units "${args[0]}" -q)" -- "$cur"))
            fi
            return
            ;;
        --verb)
            COMPREPLY=($(compgen -W "start stop restart autostart deploy downgrade rollback" \
                -- "$cur"))
            return
            ;;
        -o | --output | --key | --pubkey)
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$cur"))
            return
            ;;
        --timeout | -E | --setenv | --working-directory | -n | --lines | -S | --since | \
            --memory-max | --tasks-max | --cpu-weight | --name | --signer)
            return
            ;;
    esac

    if [[ -z $verb ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "$global_opts --version --bridge" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$verbs" -- "$cur"))
        fi
        return
    fi

    if [[ $cur == -* && -z $after_dashdash ]]; then
        local opts=""
        case $verb in
            list | units) opts="-q --quiet" ;;
            create) opts="--start" ;;
            remove) opts="--keep-data" ;;
            set-limits) opts="--memory-max --tasks-max --cpu-weight" ;;
            install-unit) opts="--name --enable --now" ;;
            run) opts="-u --unit -E --setenv --working-directory -W --wait -P --pipe -t --pty --" ;;
            shell | systemctl) opts="--" ;;
            logs) opts="-u --unit -n --lines -f --follow -S --since" ;;
            deploy) opts="--allow-downgrade" ;;
            audit) opts="-n --lines" ;;
            bundle) opts="-o --output --key --pubkey" ;;
            can-i) opts="--verb --unit --signer" ;;
        esac
        COMPREPLY=($(compgen -W "$opts $global_opts" -- "$cur"))
        return
    fi

    local n=${#args[@]}
    case $verb in
        status | start | stop | restart | enable | disable | remove | watch)
            COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            ;;
        create | list | info) ;;
        set-limits | units | logs | rollback | audit)
            ((n == 0)) && COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            ;;
        deploy)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            elif ((n == 1)); then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            ;;
        bundle)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "keygen build sign verify" -- "$cur"))
            elif ((n == 1)); then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            ;;
        remove-unit | start-unit | stop-unit | restart-unit | enable-unit | disable-unit)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            elif ((n == 1)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query units "${args[0]}" -q)" -- "$cur"))
            fi
            ;;
        install-unit)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            elif ((n == 1)); then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            ;;
        run | shell)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            else
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            ;;
        systemctl)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            elif ((n == 1)); then
                COMPREPLY=($(compgen -W "list-units list-timers list-unit-files status show cat
                    start stop restart reload daemon-reload is-system-running" -- "$cur"))
            fi
            ;;
        can-i)
            if ((n == 0)); then
                COMPREPLY=($(compgen -W "$actions" -- "$cur"))
            elif ((n == 1)); then
                COMPREPLY=($(compgen -W "$(_capsulectl_query list -q)" -- "$cur"))
            fi
            ;;
    esac
}

complete -F _capsulectl capsulectl
