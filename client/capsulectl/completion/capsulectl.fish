# fish completion for capsulectl(1)
#
# Verbs and options are completed from this file; capsule and unit names are asked from capsuled
# itself (`capsulectl list -q`, `capsulectl units NAME -q`), through the same --address/-H the
# command line being completed uses, never prompting for a password and giving up after 2 s: a
# user is offered exactly the capsules the policy lets them see. Installed as capsulectl.fish in
# a fish completions directory (capsuled install: /usr/share/fish/vendor_completions.d for
# --prefix /usr, else /etc/fish/completions, which fish always reads).

# Options that take a value in the next word: their values are neither verbs nor arguments.
set -g __capsulectl_with_value --address -H --host --timeout -u --unit -E --setenv \
    --working-directory -n --lines -S --since --memory-max --tasks-max --cpu-weight --name --verb \
    -o --output --key --pubkey --signer

# Print the connection options (--address, -H) of the command line, one per line.
function __capsulectl_conn
    set -l tokens (commandline -opc)
    set -e tokens[1]
    while set -q tokens[1]
        switch $tokens[1]
            case --address -H --host
                set -q tokens[2]; and printf '%s\n' $tokens[1] $tokens[2]
                set -e tokens[1]
            case '--address=*' '--host=*' '-H?*'
                printf '%s\n' $tokens[1]
            case --
                return
        end
        set -e tokens[1]
    end
end

function __capsulectl_query
    capsulectl (__capsulectl_conn) --no-ask-password --timeout 2 $argv 2>/dev/null
end

# Print the verb, then the arguments typed after it (not the word being completed).
function __capsulectl_words
    set -l tokens (commandline -opc)
    set -e tokens[1]
    set -l verb
    set -l dashdash
    while set -q tokens[1]
        set -l word $tokens[1]
        set -e tokens[1]
        if test -n "$dashdash"
            printf '%s\n' $word
        else if test "$word" = --
            set dashdash 1
        else if contains -- $word $__capsulectl_with_value
            set -e tokens[1]
        else if string match -q -- '-*' $word
            continue
        else if test -z "$verb"
            set verb $word
            printf '%s\n' $word
        else
            printf '%s\n' $word
        end
    end
end

# True if no verb has been typed yet.
function __capsulectl_no_verb
    test (count (__capsulectl_words)) -eq 0
end

# True if the verb is one of $argv.
function __capsulectl_verb_is
    set -l words (__capsulectl_words)
    set -q words[1]; and contains -- $words[1] $argv
end

# What the word being completed is, from the verb and the arguments before it: capsule, unit,
# file, action, or nothing.
function __capsulectl_expects
    set -l words (__capsulectl_words)
    set -q words[1]; or return 1
    set -l verb $words[1]
    set -l n (math (count $words) - 1)
    set -l want
    switch $verb
        case status start stop restart enable disable remove watch
            set want capsule
        case set-limits units logs rollback audit
            test $n -eq 0; and set want capsule
        case deploy
            test $n -eq 0; and set want capsule
            test $n -eq 1; and set want file
        case bundle
            test $n -eq 0; and set want bundle-action
            test $n -eq 1; and set want file
        case remove-unit start-unit stop-unit restart-unit enable-unit disable-unit
            test $n -eq 0; and set want capsule
            test $n -eq 1; and set want unit
        case install-unit
            test $n -eq 0; and set want capsule
            test $n -eq 1; and set want file
        case run shell
            test $n -eq 0; and set want capsule
            test $n -ge 1; and set want file
        case systemctl
            test $n -eq 0; and set want capsule
        case can-i
            test $n -eq 0; and set want action
            test $n -eq 1; and set want capsule
    end
    test "$want" = "$argv[1]"
end

# The units of the capsule named first after the verb.
function __capsulectl_units
    set -l words (__capsulectl_words)
    set -q words[2]; and __capsulectl_query units $words[2] -q
end

complete -c capsulectl -f

# Global options, before or after the verb.
complete -c capsulectl -l json -d 'print the Varlink reply as JSON'
complete -c capsulectl -l no-ask-password -d 'never ask for a password; fail with exit status 5'
complete -c capsulectl -l address -r -F -d "capsuled's socket"
complete -c capsulectl -s H -l host -x -a '(__fish_print_hostnames)' -d "act on a remote host's capsuled over ssh"
complete -c capsulectl -l timeout -x -d 'seconds to wait for each reply'
complete -c capsulectl -l no-legend -d 'tables without header and footer'
complete -c capsulectl -s h -l help -d 'show help'
complete -c capsulectl -n __capsulectl_no_verb -l version -d 'print the version'
complete -c capsulectl -n __capsulectl_no_verb -l bridge -d 'relay standard input/output to the local socket'

# Verbs.
complete -c capsulectl -n __capsulectl_no_verb -a list -d 'list the capsules you may see'
complete -c capsulectl -n __capsulectl_no_verb -a status -d "show a capsule's state, like systemctl status"
complete -c capsulectl -n __capsulectl_no_verb -a create -d 'create a capsule owned by you'
complete -c capsulectl -n __capsulectl_no_verb -a start -d 'start capsules'
complete -c capsulectl -n __capsulectl_no_verb -a stop -d 'stop capsules'
complete -c capsulectl -n __capsulectl_no_verb -a restart -d 'restart capsules'
complete -c capsulectl -n __capsulectl_no_verb -a remove -d 'stop, delete and forget capsules'
complete -c capsulectl -n __capsulectl_no_verb -a enable -d 'start capsules at boot'
complete -c capsulectl -n __capsulectl_no_verb -a disable -d 'do not start capsules at boot'
complete -c capsulectl -n __capsulectl_no_verb -a set-limits -d 'set memory, task and CPU limits'
complete -c capsulectl -n __capsulectl_no_verb -a units -d 'list the user units in a capsule'
complete -c capsulectl -n __capsulectl_no_verb -a install-unit -d 'install a unit file into a capsule'
complete -c capsulectl -n __capsulectl_no_verb -a remove-unit -d 'stop, disable and delete a unit'
complete -c capsulectl -n __capsulectl_no_verb -a start-unit -d 'start a unit in a capsule'
complete -c capsulectl -n __capsulectl_no_verb -a stop-unit -d 'stop a unit in a capsule'
complete -c capsulectl -n __capsulectl_no_verb -a restart-unit -d 'restart a unit in a capsule'
complete -c capsulectl -n __capsulectl_no_verb -a enable-unit -d 'make a unit start with its capsule'
complete -c capsulectl -n __capsulectl_no_verb -a disable-unit -d 'undo enable-unit'
complete -c capsulectl -n __capsulectl_no_verb -a run -d 'run a command in a capsule (like systemd-run --capsule)'
complete -c capsulectl -n __capsulectl_no_verb -a shell -d 'an interactive login shell (or CMD) in a capsule, as its user'
complete -c capsulectl -n __capsulectl_no_verb -a systemctl -d 'systemctl --user inside a capsule: every systemctl verb'
complete -c capsulectl -n __capsulectl_no_verb -a logs -d "show a capsule's journal"
complete -c capsulectl -n __capsulectl_no_verb -a watch -d 'print capsule state changes as they happen'
complete -c capsulectl -n __capsulectl_no_verb -a deploy -d 'deploy a signed bundle into a capsule'
complete -c capsulectl -n __capsulectl_no_verb -a rollback -d 'return a capsule to its previous bundle version'
complete -c capsulectl -n __capsulectl_no_verb -a audit -d "list the audit trail's records about a capsule"
complete -c capsulectl -n __capsulectl_no_verb -a bundle -d 'make, sign and check deploy bundles (offline)'
complete -c capsulectl -n __capsulectl_no_verb -a can-i -d 'ask what the policy would decide for you'
complete -c capsulectl -n __capsulectl_no_verb -a info -d "show capsuled's version, systemd's, and the policy backend"

# Arguments, by position after the verb.
complete -c capsulectl -n '__capsulectl_expects capsule' -a '(__capsulectl_query list -q)' -d capsule
complete -c capsulectl -n '__capsulectl_expects unit' -a '(__capsulectl_units)' -d unit
complete -c capsulectl -n '__capsulectl_expects file' -F
complete -c capsulectl -n '__capsulectl_expects action' -a 'read create remove manage manage-units run set-limits deploy start stop restart enable disable autostart status list logs units audit rollback' -d action
complete -c capsulectl -n '__capsulectl_expects bundle-action' -a 'keygen build sign verify' -d 'bundle action'

# Options of the verbs.
complete -c capsulectl -n '__capsulectl_verb_is list units' -s q -l quiet -d 'print only the names'
complete -c capsulectl -n '__capsulectl_verb_is create' -l start -d 'leave the capsule running'
complete -c capsulectl -n '__capsulectl_verb_is remove' -l keep-data -d "keep the capsule's data; only forget capsuled's record"
complete -c capsulectl -n '__capsulectl_verb_is set-limits' -l memory-max -x -d 'MemoryMax=, e.g. 512M, or infinity'
complete -c capsulectl -n '__capsulectl_verb_is set-limits' -l tasks-max -x -d 'TasksMax=, or infinity'
complete -c capsulectl -n '__capsulectl_verb_is set-limits' -l cpu-weight -x -d 'CPUWeight= (1..10000), or default'
complete -c capsulectl -n '__capsulectl_verb_is install-unit' -l name -x -d "the unit's name (default: the file's base name)"
complete -c capsulectl -n '__capsulectl_verb_is install-unit' -l enable -d 'start it with the capsule'
complete -c capsulectl -n '__capsulectl_verb_is install-unit' -l now -d 'start it now'
complete -c capsulectl -n '__capsulectl_verb_is run' -s u -l unit -x -d 'name of the transient service'
complete -c capsulectl -n '__capsulectl_verb_is run' -s E -l setenv -x -d 'set an environment variable (NAME=VALUE)'
complete -c capsulectl -n '__capsulectl_verb_is run' -l working-directory -x -a '(__fish_complete_directories)' -d 'absolute working directory'
complete -c capsulectl -n '__capsulectl_verb_is run' -s W -l wait -d 'wait for the command and exit with its status'
complete -c capsulectl -n '__capsulectl_verb_is run' -s P -l pipe -d 'give the command this stdin, stdout and stderr'
complete -c capsulectl -n '__capsulectl_verb_is run' -s t -l pty -d 'give the command a terminal relayed to this one'
complete -c capsulectl -n '__capsulectl_verb_is logs' -s u -l unit -x -a '(__capsulectl_units)' -d "only this user unit's entries"
complete -c capsulectl -n '__capsulectl_verb_is logs' -s n -l lines -x -d 'the N newest entries'
complete -c capsulectl -n '__capsulectl_verb_is logs' -s f -l follow -d 'keep printing new entries'
complete -c capsulectl -n '__capsulectl_verb_is logs' -s S -l since -x -a 'today yesterday -1h' -d 'entries since TIME'
complete -c capsulectl -n '__capsulectl_verb_is deploy' -l allow-downgrade -d 'deploy even an older version'
complete -c capsulectl -n '__capsulectl_verb_is audit' -s n -l lines -x -d 'the N newest records'
complete -c capsulectl -n '__capsulectl_verb_is bundle' -s o -l output -r -F -d 'build: the bundle file to write'
complete -c capsulectl -n '__capsulectl_verb_is bundle' -l key -r -F -d 'sign: the private key'
complete -c capsulectl -n '__capsulectl_verb_is bundle' -l pubkey -r -F -d 'verify: the public key to trust'
complete -c capsulectl -n '__capsulectl_verb_is can-i' -l verb -x -a 'start stop restart autostart deploy downgrade rollback' -d 'for manage or deploy: the verb'
complete -c capsulectl -n '__capsulectl_verb_is can-i' -l unit -x -d 'for manage-units: the unit'
complete -c capsulectl -n '__capsulectl_verb_is can-i' -l signer -x -d 'for deploy: the signer'
