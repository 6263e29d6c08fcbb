{{/* Chart name. */}}
{{- define "funchat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix of every object. */}}
{{- define "funchat.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels; dict "ctx" . "component" name. */}}
{{- define "funchat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "funchat.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels; dict "ctx" . "component" name. */}}
{{- define "funchat.labels" -}}
{{ include "funchat.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: funchat
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Object name of a model service (audio_tokenizer -> <fullname>-audio-tokenizer). */}}
{{- define "funchat.modelServiceName" -}}
{{- printf "%s-%s" (include "funchat.fullname" .ctx) (.name | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A model service's settings: modelServiceDefaults merged with modelServices.<name>; dict "ctx" . "name" name. */}}
{{- define "funchat.modelServiceValues" -}}
{{- $own := index .ctx.Values.modelServices .name | default dict -}}
{{- include "funchat.deepMerge" (dict "dst" .ctx.Values.modelServiceDefaults "src" $own) -}}
{{- end -}}

{{/* YAML of dst with src merged in (maps recursively; any other src value, even "", 0, false
or [], replaces dst's: unlike mergeOverwrite, which skips empty values). */}}
{{- define "funchat.deepMerge" -}}
{{- $dst := deepCopy .dst -}}
{{- range $k, $v := .src -}}
{{- if and (kindIs "map" $v) (kindIs "map" (index $dst $k)) -}}
{{- $_ := set $dst $k (include "funchat.deepMerge" (dict "dst" (index $dst $k) "src" $v) | fromYaml) -}}
{{- else -}}
{{- $_ := set $dst $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml $dst -}}
{{- end -}}

{{/* image: dict with repository, tag, pullPolicy; "ctx" for the default tag. */}}
{{- define "funchat.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Restricted container securityContext. */}}
{{- define "funchat.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod securityContext. */}}
{{- define "funchat.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Names of the secrets. */}}
{{- define "funchat.resumeSecretName" -}}
{{- default (printf "%s-resume" (include "funchat.fullname" .)) .Values.secrets.resume.existingSecret -}}
{{- end -}}
{{- define "funchat.redisSecretName" -}}
{{- default (printf "%s-redis" (include "funchat.fullname" .)) .Values.redis.internal.existingSecret -}}
{{- end -}}
{{- define "funchat.checkpointClaimName" -}}
{{- if eq .Values.modelStorage.mode "existingClaim" -}}
{{- .Values.modelStorage.existingClaim.claimName -}}
{{- else -}}
{{- default (printf "%s-checkpoint-cache" (include "funchat.fullname" .)) .Values.modelStorage.download.claimName -}}
{{- end -}}
{{- end -}}

{{/* Redis password env var (REDIS_PASSWORD), if there is a password. */}}
{{- define "funchat.redisPasswordEnv" -}}
{{- if eq .Values.redis.mode "internal" }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "funchat.redisSecretName" . }}
      key: {{ .Values.redis.internal.passwordKey }}
{{- else if .Values.redis.external.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.passwordKey }}
{{- end }}
{{- end -}}

{{/* FUNCHAT_REDIS_URL with $(REDIS_PASSWORD) expanded by the kubelet (must follow REDIS_PASSWORD in env). */}}
{{- define "funchat.redisUrl" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- $address := default (printf "%s-redis:6379" (include "funchat.fullname" .)) .Values.orchestrator.addresses.redis -}}
{{- printf "redis://:$(REDIS_PASSWORD)@%s/0" $address -}}
{{- else -}}
{{- $parts := splitn "://" 2 .Values.redis.external.url -}}
{{- if .Values.redis.external.existingSecret -}}
{{- printf "%s://:$(REDIS_PASSWORD)@%s" $parts._0 $parts._1 -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* FUNCHAT_ENDPOINTS JSON: each model service's Service, grpc port, unless
orchestrator.addresses names another address. */}}
{{- define "funchat.endpoints" -}}
{{- $out := dict -}}
{{- range $name := list "audio_tokenizer" "llm" "refined_head" "vocoder" -}}
{{- $derived := printf "%s:8001" (include "funchat.modelServiceName" (dict "ctx" $ "name" $name)) -}}
{{- $_ := set $out $name (default $derived (index $.Values.orchestrator.addresses $name)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Checkpoint volume (read-only in the main containers). */}}
{{- define "funchat.checkpointVolume" -}}
- name: checkpoint
  persistentVolumeClaim:
    claimName: {{ include "funchat.checkpointClaimName" . }}
    readOnly: {{ eq .Values.modelStorage.mode "existingClaim" }}
{{- if eq .Values.modelStorage.mode "download" }}
- name: fetch
  configMap:
    name: {{ include "funchat.fullname" . }}-fetch
    defaultMode: 0555
{{- end }}
{{- end -}}

{{- define "funchat.checkpointMount" -}}
- name: checkpoint
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
  {{- with .Values.modelStorage.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end -}}

{{/* Init container fetching the checkpoint (mode download). */}}
{{- define "funchat.fetchInitContainer" -}}
{{- if eq .Values.modelStorage.mode "download" }}
{{- $d := .Values.modelStorage.download }}
- name: fetch-checkpoint
  image: {{ printf "%s:%s" $d.image.repository $d.image.tag }}
  imagePullPolicy: {{ $d.image.pullPolicy }}
  command: [/bin/sh, /etc/funchat/fetch/fetch_checkpoint.sh, /cache, /etc/funchat/fetch/manifest]
  securityContext:
    {{- include "funchat.containerSecurityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 256Mi
  volumeMounts:
    - name: checkpoint
      mountPath: /cache
      {{- with .Values.modelStorage.subPath }}
      subPath: {{ . }}
      {{- end }}
    - name: fetch
      mountPath: /etc/funchat/fetch
      readOnly: true
{{- end }}
{{- end -}}

{{/* FUNCHAT_PARAMS of the image's entrypoint: "KEY=VALUE ..." (shell-quoted) from a parameters map. */}}
{{- define "funchat.paramsEnv" -}}
{{- $items := list -}}
{{- range $k, $v := . -}}
{{- $items = append $items (printf "%s=%s" $k (squote $v)) -}}
{{- end -}}
{{- join " " $items -}}
{{- end -}}
