# zsh -f zsh_completion_harness.zsh COMPDIR OUT LINE...
#
# Types each LINE followed by Tab into an interactive `zsh -f` on a pseudo-terminal, with the
# completion functions of COMPDIR first on $fpath, and appends what the completion system
# offered to OUT (one match per line, then @@END@@ per LINE). A shell function `capsulectl`
# stands in for the client: it logs its arguments to OUT.queries (@@END@@ per LINE there too)
# and answers `list -q` and `units web -q` the way the real one does.
zmodload zsh/zpty || exit 3
local compdir=$1 out=$2
shift 2
zpty z zsh -f -i
zpty -w z "PROMPT='' RPROMPT=''; fpath=(${(q)compdir} \$fpath)"
zpty -w z "autoload -Uz compinit; compinit -u -D"
zpty -w z "capsulectl() {
  print -r -- \"\$*\" >> ${(q)out}.queries
  case \"\$*\" in
    (*' list -q') print -l web webb db ;;
    (*' units web -q') print -l app.service api.service ;;
  esac
}"
# Every compadd that adds matches (not those only asking, -O/-A/-D) records them.
zpty -w z "compadd() {
  if [[ \${@[1,(i)(-|--)]} == *-(O|A|D)\\ * ]]; then builtin compadd \"\$@\"; return; fi
  local -a __hits
  builtin compadd -A __hits \"\$@\"
  (( \$#__hits )) && print -rl -- \$__hits >> ${(q)out}
}"
# Tab completes, then marks the end of this line's results in both files and on the terminal.
zpty -w z "_tab() {
  zle complete-word
  print -r -- @@END@@ | tee -a ${(q)out} >> ${(q)out}.queries
  print -n '@@''DONE@@'
}"
zpty -w z "zle -N _tab; bindkey '^I' _tab; bindkey '^U' kill-whole-line; print RE''ADY"
zpty -r z chunk '*READY*' || exit 4
local line
for line in "$@"; do
  zpty -w -n z $'\C-u'"$line"$'\t'
  zpty -r z chunk '*@@DONE@@*' || exit 5
done
zpty -d z
